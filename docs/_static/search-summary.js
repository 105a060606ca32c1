/* Search results: summaries from the page's prose only. Sphinx takes a result's summary from
 * the text of the page, fetched without running MathJax, so it would show raw TeX and the "Run
 * this tutorial yourself" box at the top of every tutorial. */
document.addEventListener("DOMContentLoaded", () => {
  if (typeof Search === "undefined" || !Search.htmlToText) return;
  const original = Search.htmlToText;
  const unwanted = [".run-this-notebook", ".prompt", "div.math", ".supported-box"];
  // The TeX commands of the tutorials' inline math, as the characters they print.
  const symbols = {
    sum: "Σ", nabla: "∇", theta: "θ", delta: "δ", alpha: "α", lambda: "λ", sigma: "σ",
    Sigma: "Σ", varepsilon: "ε", epsilon: "ε", cdot: "·", top: "ᵀ", in: "∈", approx: "≈",
    le: "≤", ge: "≥", otimes: "⊗", odot: "⊙", to: "→", infty: "∞", partial: "∂",
  };
  Search.htmlToText = (htmlString, anchor) => {
    const page = new DOMParser().parseFromString(htmlString, "text/html");
    page.querySelectorAll(unwanted.join(",")).forEach((el) => el.remove());
    page.querySelectorAll("span.math").forEach((el) => {
      // \( g_i \) -> g_i: the formula's letters, without TeX commands and delimiters
      el.textContent = el.textContent
        .replace(/\\[()[\]]/g, "")
        .replace(/\\[,;!: ]/g, " ")
        .replace(/\\\|/g, "‖")
        .replace(/\\([a-zA-Z]+)\s?/g, (_, name) => symbols[name] || "")
        .replace(/[{}^]/g, "")
        .trim();
    });
    return original(page.documentElement.outerHTML, anchor);
  };
});
