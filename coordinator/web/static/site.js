// Progressive enhancement; every page works without it.
// 1. Filter forms marked data-autosubmit submit when a select changes (as do fields marked
//    data-autosubmit-field).
// 2. A sortable table holding every row (data-complete="true") sorts in place when a column
//    header is clicked; otherwise the header's link asks the server to sort across pages.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    for (const select of form.querySelectorAll("select")) {
      select.addEventListener("change", () => form.submit());
    }
  }
  for (const field of document.querySelectorAll("[data-autosubmit-field]")) {
    field.addEventListener("change", () => field.form.submit());
  }
  for (const table of document.querySelectorAll("table.sortable")) {
    if (table.dataset.complete === "true") makeSortable(table);
  }
});

function cellValue(row, index) {
  const cell = row.cells[index];
  if (!cell) return null;
  const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
  if (raw === "" || raw === "None") return null;
  const number = Number(raw);
  return Number.isNaN(number) ? raw.toLowerCase() : number;
}

function makeSortable(table) {
  const headers = Array.from(table.tHead.rows[0].cells);
  const body = table.querySelector("tbody.rows");
  headers.forEach((header, index) => {
    const link = header.querySelector("a");
    if (!link || !header.dataset.sortKey) return;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      // First click sorts descending (best first), the next one flips.
      const descending = !(header.classList.contains("sorted") && header.classList.contains("desc"));
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const x = cellValue(a, index), y = cellValue(b, index);
        if (x === null && y === null) return 0;
        if (x === null) return 1; // missing values last either way
        if (y === null) return -1;
        const order = x < y ? -1 : x > y ? 1 : 0;
        return descending ? -order : order;
      });
      for (const row of rows) body.appendChild(row);
      for (const other of headers) {
        other.classList.remove("sorted", "asc", "desc");
        other.removeAttribute("aria-sort");
      }
      header.classList.add("sorted", descending ? "desc" : "asc");
      header.setAttribute("aria-sort", descending ? "descending" : "ascending");
      const url = new URL(link.href, window.location.href);
      url.searchParams.set("order", descending ? "desc" : "asc");
      window.history.replaceState(null, "", url);
    });
  });
}
