// A small element builder: text always goes in as text, never as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function table(caption, headers, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      // each cell names its column, for the stacked layout of narrow screens (style.css)
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) => h("td", { "data-label": headers[i] }, c)))))));
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}

let fieldIds = 0;
// A labelled input: returns [wrapper, input].
export function field(label, attrs = {}) {
  const id = `f${++fieldIds}`;
  const input = h(attrs.tag || "input", { id, ...attrs, tag: null });
  return [h("div", { class: "field" }, h("label", { for: id }, label), input), input];
}

export function select(label, options, value) {
  const id = `f${++fieldIds}`;
  const el = h("select", { id }, options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));
  return [h("div", { class: "field" }, h("label", { for: id }, label), el), el];
}

// A modal confirmation: resolves true only on the explicit confirm button.
export function confirmDialog(message, confirmLabel) {
  return new Promise((resolve) => {
    const dialog = h("dialog", { "aria-labelledby": "confirm-text" },
      h("p", { id: "confirm-text" }, message),
      h("div", { class: "actions" },
        h("button", { type: "button", class: "secondary", onclick: () => dialog.close("no") }, "Cancel"),
        h("button", { type: "button", class: "danger", onclick: () => dialog.close("yes") }, confirmLabel)));
    dialog.addEventListener("close", () => { dialog.remove(); resolve(dialog.returnValue === "yes"); });
    document.body.append(dialog);
    dialog.showModal();
  });
}
