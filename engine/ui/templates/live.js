// Running runs update in place: poll the live endpoint while the page shows any, and say when
// new runs arrive. No reload, no framework.
(function () {
  var POLL_MS = 1500;
  var total = document.getElementById("total");
  var notice = document.getElementById("new-runs");
  function running() {
    return Array.prototype.map.call(document.querySelectorAll("tr[data-state=running]"),
      function (tr) { return tr.dataset.uid; });
  }
  function update(uid, run) {
    var tr = document.querySelector("tr[data-uid='" + uid + "']");
    if (!tr) return;
    tr.dataset.state = run.state;
    var badge = tr.querySelector("td.state .badge");
    badge.textContent = run.state;
    badge.className = "badge state-" + run.state;
    tr.querySelector("td.duration").textContent = run.duration;
    Object.keys(run.values).forEach(function (column) {
      var cell = tr.querySelector("td[data-col='" + CSS.escape(column) + "']");
      if (cell) cell.textContent = run.values[column];
    });
  }
  function poll() {
    var params = new URLSearchParams(window.location.search);
    params.delete("live");
    running().forEach(function (uid) { params.append("live", uid); });
    fetch("/api/runs/live?" + params.toString(), {headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) return;
        Object.keys(data.runs).forEach(function (uid) { update(uid, data.runs[uid]); });
        var shown = parseInt(total.dataset.total, 10);
        if (data.total > shown) {
          notice.hidden = false;
          notice.textContent = (data.total - shown) + " new run(s) since this page loaded — ";
          var a = document.createElement("a");
          a.href = window.location.href;
          a.textContent = "show them";
          notice.appendChild(a);
        }
      })
      .catch(function () {})
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }
  window.setTimeout(poll, POLL_MS);
})();
