// The run page's tabs (Run, Logs), and the Logs tab following a running run: poll the run's log
// endpoint and append the new lines as text (never as markup), until the run is no longer running.
(function () {
  var POLL_MS = 1000;
  var KEEP_LINES = 20000;  // lines kept on the page; older ones are dropped as new ones arrive
  var STREAMS = {stdout: 1, stderr: 1, console: 1, logger: 1};
  document.querySelectorAll("section.run").forEach(function (section) {
    var nav = section.querySelector("[data-tabs]");
    var pre = section.querySelector("pre[data-log]");
    if (!nav || !pre) return;
    var total = nav.querySelector("[data-log-total]");
    function show(name) {
      section.querySelectorAll("[data-panel]").forEach(function (panel) {
        panel.hidden = panel.dataset.panel !== name;
      });
      nav.querySelectorAll("[data-tab]").forEach(function (tab) {
        tab.classList.toggle("on", tab.dataset.tab === name);
        tab.setAttribute("aria-selected", tab.dataset.tab === name ? "true" : "false");
      });
    }
    nav.hidden = false;
    nav.addEventListener("click", function (event) {
      var tab = event.target.closest("[data-tab]");
      if (!tab) return;
      show(tab.dataset.tab);
      history.replaceState(null, "", tab.dataset.tab === "logs" ? "#logs" : "#");
    });
    show(window.location.hash === "#logs" ? "logs" : "run");

    function append(lines) {
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      var fragment = document.createDocumentFragment();
      lines.forEach(function (line) {
        var span = document.createElement("span");
        span.className = "log-" + (STREAMS[line[1]] ? line[1] : "other");
        span.textContent = line[2] + "\n";
        fragment.appendChild(span);
        pre.dataset.after = line[0];
      });
      pre.appendChild(fragment);
      while (pre.childNodes.length > KEEP_LINES) pre.removeChild(pre.firstChild);
      pre.hidden = false;
      var empty = section.querySelector("[data-log-empty]");
      if (empty) empty.remove();
      if (total) total.textContent = pre.dataset.after;
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    function poll() {
      fetch("/api/runs/" + encodeURIComponent(pre.dataset.log) + "/log?after=" + encodeURIComponent(pre.dataset.after),
            {headers: {"Accept": "application/json"}})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (!data) return POLL_MS;
          if (data.lines.length) append(data.lines);
          pre.dataset.state = data.state;
          return data.more ? 0 : POLL_MS;
        })
        .catch(function () { return POLL_MS; })
        .then(function (wait) {
          if (pre.dataset.state === "running" || wait === 0) window.setTimeout(poll, wait);
        });
    }
    if (pre.dataset.state === "running") window.setTimeout(poll, POLL_MS);
  });
})();
