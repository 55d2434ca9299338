// Signup page: upload a public key, or make a key pair here with OpenPGP.js (served by this
// server, never a CDN). Only the public key is ever sent.

const $ = (id) => document.getElementById(id);

function show(element, text, ok) {
  element.textContent = text;
  element.className = ok ? "ok" : "error";
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { message: `The server answered ${response.status}.` };
  }
  return { ok: response.ok, data };
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

async function keyPayload() {
  const file = $("keyfile").files[0];
  if (file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    const head = new TextDecoder().decode(bytes.subarray(0, 64));
    if (head.includes("-----BEGIN PGP")) return { key: new TextDecoder().decode(bytes) };
    return { key_base64: base64(bytes) };
  }
  return { key: $("key").value };
}

function offerDownload(link, text) {
  link.href = URL.createObjectURL(new Blob([text], { type: "application/pgp-keys" }));
}

async function generate() {
  const address = $("address").value.trim();
  const status = $("result");
  if (!$("address").checkValidity() || !address) {
    show(status, "Enter your e-mail address first.", false);
    $("address").focus();
    return;
  }
  let openpgp;
  try {
    openpgp = await import("/static/openpgp.min.mjs");
  } catch {
    $("gen-available").hidden = true;
    $("gen-unavailable").hidden = false;
    return;
  }
  show(status, "Generating…", true);
  const passphrase = $("passphrase").value;
  // v4 keys (OpenPGP.js v6's default), Ed25519 + Curve25519, user ID = the address only.
  const { privateKey, publicKey, revocationCertificate } = await openpgp.generateKey({
    type: "ecc",
    curve: "curve25519Legacy",
    userIDs: [{ email: address }],
    passphrase: passphrase || undefined,
    format: "armored",
  });
  const safeName = address.replace(/[^A-Za-z0-9@._-]/g, "_");
  $("download-private").download = `${safeName}-private-key.asc`;
  $("download-revocation").download = `${safeName}-revocation-certificate.asc`;
  offerDownload($("download-private"), privateKey);
  offerDownload($("download-revocation"), revocationCertificate);
  $("key").value = publicKey;
  $("keyfile").value = "";
  $("generated").hidden = false;
  show(status, "Key pair generated. Save the private key, then press “Register key”.", true);
  $("download-private").focus();
}

async function register(event) {
  event.preventDefault();
  const status = $("result");
  const payload = await keyPayload();
  if (!payload.key_base64 && !payload.key.trim()) {
    show(status, "Paste your public key, choose its file, or generate a key pair.", false);
    return;
  }
  show(status, "Sending…", true);
  const request = { address: $("address").value.trim(), ...payload };
  if ($("hide-subject").checked) request.header_protection = "hide-subject";
  if (!$("existing-offer").hidden && $("encrypt-existing").checked) request.encrypt_existing = true;
  const { ok, data } = await post("/api/v1/keys", request);
  show(status, data.message || "Something went wrong.", ok);
}

async function withdraw(event) {
  event.preventDefault();
  const { ok, data } = await post("/api/v1/withdraw", { address: $("withdraw-address").value.trim() });
  show($("withdraw-result"), data.message || "Something went wrong.", ok);
}

async function protect(event) {
  event.preventDefault();
  const { ok, data } = await post("/api/v1/header-protection", {
    address: $("protect-address").value.trim(),
    header_protection: $("protect-setting").value,
  });
  show($("protect-result"), data.message || "Something went wrong.", ok);
}

async function probe() {
  // A HEAD request tells whether key generation can work here, before anyone tries.
  try {
    const response = await fetch("/static/openpgp.min.mjs", { method: "HEAD" });
    if (response.ok) return;
  } catch {
    // fall through
  }
  $("gen-available").hidden = true;
  $("gen-unavailable").hidden = false;
}

$("generate").addEventListener("click", () => {
  generate().catch((error) => show($("result"), `Key generation failed: ${error.message}`, false));
});
$("upload").addEventListener("submit", (event) => {
  register(event).catch(() => show($("result"), "The server could not be reached.", false));
});
$("withdraw").addEventListener("submit", (event) => {
  withdraw(event).catch(() => show($("withdraw-result"), "The server could not be reached.", false));
});
$("protect").addEventListener("submit", (event) => {
  protect(event).catch(() => show($("protect-result"), "The server could not be reached.", false));
});
async function offers() {
  // The page works without this: the offer stays hidden unless the server makes it.
  try {
    const response = await fetch("/api/v1/options");
    if (response.ok && (await response.json()).encrypt_existing === true) {
      $("existing-offer").hidden = false;
    }
  } catch {
    // keep it hidden
  }
}

probe();
offers();
