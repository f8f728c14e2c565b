// Render the math that pymdownx.arithmatex marks (generic mode: \( \) inline, \[ \] display) with the KaTeX that the
// site serves itself (assets/katex/): no CDN. Material's instant navigation re-runs this on every page (document$).
function renderMath(root) {
  root.querySelectorAll(".arithmatex").forEach(function (element) {
    if (element.dataset.katexRendered) return;
    var text = element.textContent.trim();
    var display = element.tagName === "DIV" || text.startsWith("\\[");
    text = text.replace(/^\\[\[(]/, "").replace(/\\[\])]$/, "");
    try {
      katex.render(text, element, { displayMode: display, throwOnError: false, strict: "ignore" });
      element.dataset.katexRendered = "1";
    } catch (error) {
      console.error("KaTeX:", error, text);
    }
  });
}
// Headings with math reach the table of contents and the navigation as plain text "\\( ... \\)": render those too.
function renderNavMath(root) {
  root.querySelectorAll(".md-nav__link, .md-nav__link .md-ellipsis").forEach(function (element) {
    if (element.children.length > 0 || element.textContent.indexOf("\\(") < 0) return;
    var text = element.textContent;
    element.innerHTML = text.split(/\\\((.+?)\\\)/).map(function (part, index) {
      if (index % 2 === 0) return part.replace(/&/g, "&amp;").replace(/</g, "&lt;");
      return katex.renderToString(part, { throwOnError: false, strict: "ignore" });
    }).join("");
  });
}
function renderAll() {
  renderMath(document.body);
  renderNavMath(document.body);
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderAll);
} else {
  document.addEventListener("DOMContentLoaded", renderAll);
}
