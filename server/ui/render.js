// Model text to DOM nodes with light formatting (paragraphs, ``` fenced code blocks, `inline code`).
// Text only ever reaches the page through textContent and text nodes, never as HTML: a reply holding <script> or
// <img onerror> shows those characters.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)\s*$/;

/** [{kind: "text", text} | {kind: "code", text, lang, open}] in order; an unclosed fence runs to the end. */
export function blocks(text) {
  const out = [];
  let lines = [];
  let fence = null;
  let lang = "";
  const flush = (kind, extra = {}) => {
    if (kind === "code" || lines.length) out.push({ kind, text: lines.join("\n"), ...extra });
    lines = [];
  };
  for (const line of text.split("\n")) {
    const match = line.match(FENCE);
    if (fence === null && match) {
      flush("text");
      fence = match[1];
      lang = match[2];
    } else if (fence !== null && match && !match[2] && match[1][0] === fence[0] && match[1].length >= fence.length) {
      flush("code", { lang, open: false });
      fence = null;
    } else {
      lines.push(line);
    }
  }
  if (fence !== null) flush("code", { lang, open: true });
  else flush("text");
  return out;
}

/** Replace container's children with the formatted text. */
export function renderText(container, text) {
  const nodes = [];
  for (const block of blocks(text)) {
    if (block.kind === "code") {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = block.text;
      if (block.lang) pre.dataset.lang = block.lang;
      pre.append(code);
      nodes.push(pre);
      continue;
    }
    for (const para of block.text.split(/\n[ \t]*\n/)) {
      const trimmed = para.replace(/^\s*\n/, "").replace(/\s+$/, "");
      if (!trimmed.trim()) continue;
      const p = document.createElement("p");
      appendInline(p, nodes.length ? trimmed : trimmed.replace(/^ +/, ""));
      nodes.push(p);
    }
  }
  container.replaceChildren(...nodes);
}

/** Text with `inline code` spans, as text nodes and <code> elements. */
function appendInline(parent, text) {
  const pattern = /`([^`\n]+)`/g;
  let last = 0;
  let match;
  while ((match = pattern.exec(text)) !== null) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const code = document.createElement("code");
    code.textContent = match[1];
    parent.append(code);
    last = pattern.lastIndex;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}
