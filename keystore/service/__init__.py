"""The key service's adapters: HTTP API and pages, WKD, WKS, challenge mails."""
