// The console's shell: sign-in, the organization and project chosen once (kept in this
// browser across pages and visits), the navigation, and the page router (#/<page>).

import { currentSession, listAll, signIn, signOut } from "./api.js";
import { h, errorBox, field, select } from "./dom.js";
import { roleName } from "./format.js";
import { projectsPage } from "./page-projects.js";
import { limitsPage } from "./page-limits.js";
import { keysPage } from "./page-keys.js";
import { usagePage, metricsPage } from "./page-usage.js";
import { spendPage } from "./page-spend.js";
import { logsPage } from "./page-logs.js";
import { membersPage, auditPage } from "./page-people.js";
import { livePage } from "./page-live.js";

const PAGES = [
  ["projects", "Projects", projectsPage],
  ["limits", "Limits", limitsPage],
  ["keys", "API keys", keysPage],
  ["live", "Live", livePage],
  ["usage", "Usage", usagePage],
  ["metrics", "Metrics", metricsPage],
  ["spend", "Spend", spendPage],
  ["logs", "Logs", logsPage],
  ["members", "Members", membersPage],
  ["audit", "Audit", auditPage],
];
const WRITERS = new Set(["owner", "developer"]);

const main = document.getElementById("main");
const top = document.getElementById("top");
const state = { principal: null, orgs: [], projects: [], org: "", project: "" };

function remember() {
  localStorage.setItem("rl.org", state.org);
  localStorage.setItem("rl.project", state.project);
}

function context() {
  const role = roleName(state.principal.role);
  const operator = state.principal.kind === "operator";
  return {
    ...state,
    role: operator ? "operator" : role,
    // What the authorization table lets this role change; the server refuses the rest anyway.
    canWrite: operator || WRITERS.has(role),
    canGovern: operator || WRITERS.has(role),
    projectName: (id) => (state.projects.find((p) => p.id === id) || { name: id || "—" }).name,
    reloadProjects: async () => { await loadProjects(); renderHeader(); },
    chooseProject: async (id) => { state.project = id; await loadProjects(); renderHeader(); },
  };
}

async function loadProjects() {
  state.projects = state.org
    ? await listAll("ProjectService", "ListProjects", { organizationId: state.org }, "projects")
    : [];
  if (!state.projects.some((p) => p.id === state.project)) state.project = state.projects[0]?.id || "";
  remember();
}

async function loadOrganizations() {
  state.orgs = await listAll("OrganizationService", "ListOrganizations", {}, "organizations");
  const saved = localStorage.getItem("rl.org");
  state.org = state.orgs.some((o) => o.id === saved) ? saved : state.orgs[0]?.id || "";
  state.project = localStorage.getItem("rl.project") || "";
  await loadProjects();
}

function currentPage() {
  const name = location.hash.replace(/^#\/?/, "") || "projects";
  return PAGES.find(([n]) => n === name) || PAGES[0];
}

function renderHeader() {
  const [orgField, orgSelect] = select("Organization", state.orgs.map((o) => [o.id, o.name]), state.org);
  orgSelect.addEventListener("change", async () => { state.org = orgSelect.value; await loadProjects(); render(); });
  const [projectField, projectSelect] = select(
    "Project", state.projects.map((p) => [p.id, p.name]), state.project);
  projectSelect.addEventListener("change", () => { state.project = projectSelect.value; remember(); render(); });
  const [current] = currentPage();
  const who = state.principal;
  top.replaceChildren(
    h("div", { class: "brand" }, "ratelimitd"),
    h("div", { class: "pickers" }, orgField, projectField),
    h("div", { class: "who" },
      h("span", {}, `${who.name} · `, h("strong", { id: "role" }, context().role)),
      h("button", { type: "button", class: "secondary", id: "sign-out", onclick: doSignOut }, "Sign out")),
    h("nav", { "aria-label": "Console pages" },
      h("ul", {}, PAGES.map(([name, title]) => h("li", {},
        h("a", { href: `#/${name}`, "aria-current": name === current ? "page" : false }, title))))));
  top.hidden = false;
}

async function render() {
  renderHeader();
  const [, title, page] = currentPage();
  document.title = `${title} · ratelimitd console`;
  const body = h("div", { class: "page" }, h("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(h("h1", {}, title), body);
  try {
    body.replaceChildren(...[await page(context())].flat());
  } catch (e) {
    if (e.status === 401) return showSignIn("Your session has ended. Sign in again.");
    body.replaceChildren(errorBox(e));
  }
}

async function doSignOut() {
  await signOut();
  showSignIn("Signed out.");
}

function showSignIn(note = "") {
  top.hidden = true;
  top.replaceChildren();
  document.title = "Sign in · ratelimitd console";
  const [tokenField, tokenInput] = field("Credential", {
    type: "password", name: "token", autocomplete: "current-password", required: true,
    "aria-describedby": "token-help",
  });
  const problem = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in to ratelimitd"),
    note ? h("p", { class: "muted" }, note) : null,
    tokenField,
    h("p", { id: "token-help", class: "muted" },
      "A member credential (rlm_…) from your organization's Owner, or the operator's token."),
    problem,
    h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    try {
      state.principal = await signIn(tokenInput.value);
      tokenInput.value = "";
      await start();
    } catch (e) {
      problem.replaceChildren(errorBox(e));
    }
  });
  main.replaceChildren(form);
  tokenInput.focus();
}

async function start() {
  await loadOrganizations();
  if (!location.hash) history.replaceState(null, "", "#/projects");
  await render();
}

window.addEventListener("hashchange", () => { if (state.principal) render(); });

(async () => {
  try {
    state.principal = await currentSession();
  } catch (e) {
    state.principal = null;
  }
  if (state.principal) await start();
  else showSignIn();
})();
