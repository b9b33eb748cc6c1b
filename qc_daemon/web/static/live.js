// Keeps the "now" page live from /events (server-sent events). The page is complete without it.
"use strict";
(function () {
  const activity = document.getElementById("activity");
  if (!activity || !window.EventSource) return;
  const tbody = document.querySelector("#results tbody");
  const alerts = document.getElementById("alerts");
  const live = document.getElementById("live");
  const source = new EventSource(activity.dataset.events);
  const text = (tag, value, cls) => {
    const el = document.createElement(tag);
    el.textContent = value == null ? "" : String(value);
    if (cls) el.className = cls;
    return el;
  };
  const when = (row) => (row.scored_at || row.completed_at || "").slice(0, 19).replace("T", " ");
  const link = (row, label) => {
    const a = text("a", label);
    a.href = row.url;
    a.title = row.series_instance_uid;
    return a;
  };
  function showRow(row) {
    const key = row.series_instance_uid + "/" + row.revision;
    const tr = document.createElement("tr");
    tr.className = row.status + (row.alert ? " alert" : "") + " fresh";
    tr.dataset.key = key;
    tr.append(text("td", when(row)), text("td", row.station_name), text("td", row.series_description),
      text("td", row.status), text("td", row.score == null ? "" : row.score.toFixed(3), "num"),
      text("td", row.reason), text("td", row.node_name));
    const cell = document.createElement("td");
    cell.append(link(row, "…" + row.series_instance_uid.slice(-16)));
    if (row.revision > 1) cell.append(" r" + row.revision);
    tr.append(cell);
    const old = tbody.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
    if (old) old.replaceWith(tr); else tbody.prepend(tr);
    while (tbody.rows.length > 50) tbody.deleteRow(-1);
  }
  function raiseAlert(row, threshold) {
    const p = text("p", "", "banner");
    p.append(`Low score ${row.score.toFixed(3)} (threshold ${threshold}): `,
      text("b", row.series_description || "(no description)"),
      ` · ${row.station_name || "(no station)"} · ${when(row)} UTC · `, link(row, "series"));
    alerts.prepend(p);
    while (alerts.children.length > 5) alerts.lastElementChild.remove();
    document.title = "⚠ low score · qc-daemon";
  }
  let threshold = activity.dataset.threshold;
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "ok"; });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; live.className = "bad"; });
  source.addEventListener("result", (event) => {
    const row = JSON.parse(event.data);
    showRow(row);
    if (row.alert && row.status === "scored") raiseAlert(row, threshold);
  });
  source.addEventListener("status", (event) => {
    const s = JSON.parse(event.data);
    threshold = s.threshold;
    document.getElementById("receiving-count").textContent = s.receiving.length;
    document.getElementById("queued-count").textContent = s.queued.length;
    document.getElementById("scoring-count").textContent = s.scoring.length;
    document.getElementById("free-disk").textContent = s.free_disk_mb;
    const listener = document.getElementById("listener");
    listener.textContent = "DICOM listener " + (s.listener_up ? "up" : "down");
    listener.className = s.listener_up ? "ok" : "bad";
    const list = document.getElementById("receiving");
    list.replaceChildren(...s.receiving.map((uid) => text("li", "receiving …" + uid.slice(-24))),
      ...s.scoring.map((uid) => text("li", "scoring …" + uid.slice(-24))));
  });
})();
