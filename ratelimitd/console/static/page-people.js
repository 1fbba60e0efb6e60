// Members (add, change role, remove) and the organization's audit trail.

import { call, listAll } from "./api.js";
import { confirmDialog, errorBox, field, h, select, table } from "./dom.js";
import { roleName, when } from "./format.js";

const AUDIT_PAGE = 200;
const ROLES = [["ROLE_OWNER", "owner"], ["ROLE_DEVELOPER", "developer"], ["ROLE_READER", "reader"]];

function roleControl(ctx, m, status) {
  const [wrap, el] = select(`Role of ${m.name}`, ROLES, m.role);
  wrap.classList.add("compact");
  el.addEventListener("change", async () => {
    try {
      await call("MemberService", "UpdateMember", {
        member: { organizationId: ctx.org, id: m.id, role: el.value }, updateMask: "role" });
    } catch (e) { status.replaceChildren(errorBox(e)); }
  });
  return wrap;
}

function removeControl(ctx, m, status) {
  return h("button", {
    type: "button", class: "danger", "aria-label": `Remove ${m.name}`,
    onclick: async () => {
      if (!(await confirmDialog(`Remove ${m.name}? Their credentials and sessions stop working.`, "Remove member"))) return;
      try {
        await call("MemberService", "RemoveMember", { organizationId: ctx.org, memberId: m.id });
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      } catch (e) { status.replaceChildren(errorBox(e)); }
    },
  }, "Remove");
}

function addForm(ctx, status) {
  const [nameField, name] = field("New member name", { required: true, maxlength: 64 });
  const [roleField, role] = select("Role", ROLES, "ROLE_READER");
  const form = h("form", { class: "inline-form", "aria-label": "Add a member" },
    nameField, roleField, h("button", { type: "submit" }, "Add member"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const reply = await call("MemberService", "AddMember", { organizationId: ctx.org, name: name.value, role: role.value });
      status.replaceChildren(h("section", { class: "card secret" },
        h("h2", {}, `Credential for ${reply.member.name}`),
        h("p", { class: "warning" }, "Hand it over now: it is shown only once."),
        h("input", { readonly: true, value: reply.token, "aria-label": "The new member's credential" })));
      name.value = "";
    } catch (e) { status.replaceChildren(errorBox(e)); }
  });
  return form;
}

export async function membersPage(ctx) {
  const members = await listAll("MemberService", "ListMembers", { organizationId: ctx.org }, "members");
  const status = h("div", { "aria-live": "polite" });
  const headers = ["Name", "Role", "Added"];
  if (ctx.canGovern) headers.push("Actions");
  const rows = members.map((m) => {
    const cells = [m.name, ctx.canGovern ? roleControl(ctx, m, status) : roleName(m.role), when(m.createTime)];
    if (ctx.canGovern) cells.push(removeControl(ctx, m, status));
    return cells;
  });
  return [ctx.canGovern ? addForm(ctx, status) : null, status,
    table("Members of this organization", headers, rows, "No members yet.")];
}

export async function auditPage(ctx) {
  if (!ctx.canGovern) return h("p", { class: "muted" }, "The audit trail is for the organization's Owners.");
  // the newest page only: the trail can hold thousands of events
  const events = (await call("AuditService", "ListAuditEvents", { organizationId: ctx.org, pageSize: AUDIT_PAGE })).events || [];
  const rows = events.map((e) => [when(e.eventTime), e.operation,
    e.actor ? `${e.actor.name} (${e.actor.kind === "operator" ? "operator" : roleName(e.actor.role)})` : "—",
    e.projectId ? ctx.projectName(e.projectId) : "—", h("code", {}, e.target || "—")]);
  return table(`Audit events, the newest ${AUDIT_PAGE}`, ["Time", "Operation", "Actor", "Project", "Target"], rows, "No events.");
}
