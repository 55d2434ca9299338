// Confirmation page. A link from the mail carries the code in the fragment (#token=...),
// which browsers never send to servers: it reaches no log. Nothing changes until the button
// is pressed (a POST).

const $ = (id) => document.getElementById(id);

const match = /(?:^#|&)token=([A-Za-z0-9_-]+)/.exec(window.location.hash);
if (match) {
  $("token").value = match[1];
  history.replaceState(null, "", window.location.pathname);
}

$("confirm").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("result");
  try {
    const response = await fetch("/api/v1/confirm", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("token").value.trim() }),
    });
    const data = await response.json();
    result.textContent = data.message || `The server answered ${response.status}.`;
    result.className = response.ok ? "ok" : "error";
    if (response.ok) $("token").value = "";
  } catch {
    result.textContent = "The server could not be reached.";
    result.className = "error";
  }
});
