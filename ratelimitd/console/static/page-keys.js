// API keys: create (the secret is shown once, with a copy button and a warning), list, revoke.

import { call, listAll } from "./api.js";
import { confirmDialog, errorBox, field, h, table } from "./dom.js";
import { when } from "./format.js";

function secretBox(secret) {
  const value = h("input", { id: "new-secret", readonly: true, value: secret, "aria-label": "The new key's secret" });
  const copied = h("span", { "aria-live": "polite", class: "muted" });
  return h("section", { class: "card secret", "aria-labelledby": "secret-title" },
    h("h2", { id: "secret-title" }, "Your new API key"),
    h("p", { class: "warning", role: "note" },
      "Copy it now: this is the only time it is shown. Only its hash is stored, so it cannot be shown again."),
    h("div", { class: "copy-row" }, value,
      h("button", {
        type: "button", onclick: async () => {
          value.select();
          try { await navigator.clipboard.writeText(secret); copied.textContent = "Copied."; }
          catch { copied.textContent = "Selected: press Ctrl+C to copy."; }
        },
      }, "Copy"), copied));
}

function revokeControl(ctx, key, status) {
  return h("button", {
    type: "button", class: "danger", "aria-label": `Revoke ${key.name}`,
    onclick: async () => {
      if (!(await confirmDialog(`Revoke key ${key.name} (${key.prefix}…)? Calls with it are refused at once.`,
        "Revoke key"))) return;
      try {
        await call("ProjectService", "RevokeApiKey", { organizationId: ctx.org, keyId: key.id });
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      } catch (e) { status.replaceChildren(errorBox(e)); }
    },
  }, "Revoke");
}

export async function keysPage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const keys = await listAll("ProjectService", "ListApiKeys", { organizationId: ctx.org, projectId: ctx.project }, "keys");
  const status = h("div", { "aria-live": "polite" });
  const headers = ["Name", "Prefix", "Created", "Last used", "Status"];
  if (ctx.canWrite) headers.push("Actions");
  const rows = keys.map((k) => {
    const cells = [k.name, h("code", {}, `${k.prefix}…`), when(k.createTime), when(k.lastUseTime),
      k.revoked ? h("span", { class: "badge bad" }, "revoked") : h("span", { class: "badge ok" }, "active")];
    if (ctx.canWrite) cells.push(k.revoked ? "" : revokeControl(ctx, k, status));
    return cells;
  });
  const parts = [];
  if (ctx.canWrite) {
    const [nameField, nameInput] = field("New key name", { name: "key-name", required: true, maxlength: 64 });
    const form = h("form", { class: "inline-form", "aria-label": "Create an API key" },
      nameField, h("button", { type: "submit" }, "Create key"));
    const shown = h("div", {});
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      status.replaceChildren();
      try {
        const reply = await call("ProjectService", "CreateApiKey", {
          organizationId: ctx.org, projectId: ctx.project, name: nameInput.value });
        nameInput.value = "";
        const again = await keysPage(ctx);
        shown.closest(".page").replaceChildren(secretBox(reply.secret), ...again);
      } catch (e) { status.replaceChildren(errorBox(e)); }
    });
    parts.push(form, shown);
  }
  parts.push(status, table(`API keys of ${ctx.projectName(ctx.project)}`, headers, rows, "No keys yet."));
  return parts;
}
