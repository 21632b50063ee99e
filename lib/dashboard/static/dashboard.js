// Browser side of the dashboard page (loaded by lib/dashboard/app.py, limits filled in there).
// Upload guard: a file over the cap (or past the batch budget) is read as zero bytes, so the websocket never
// carries an oversize message (tornado would drop the connection) and the kernel answers with a message.
// Kernel release: Voila 0.5 shuts a visitor's kernel down with a beforeunload beacon carrying the _xsrf
// cookie, which its page never sets (voila-dashboards/voila#1458: 403, the kernel lives until culled).
// A random token in that cookie satisfies tornado's double-submit check and lets the beacon through.
// Connection watch: the widgets live in this page's own kernel and need its websocket. When the page cannot reach
// that kernel (gone before the page connected, or never answering), Voila shows the widget's plain-text form and
// nothing else. The page hides that text, says what happened, and loads itself again (a fresh kernel) a few times
// before it asks the visitor to; a tab that loses its kernel later says so too.
(function () {
  window.harUploadLimits = {file: __MAX_FILE_BYTES__, batch: __MAX_BATCH_BYTES__};
  if (!/\b_xsrf=/.test(document.cookie) && window.crypto && crypto.getRandomValues) {
    var bytes = crypto.getRandomValues(new Uint8Array(16)), hex = "";
    for (var i = 0; i < bytes.length; i++) hex += ("0" + bytes[i].toString(16)).slice(-2);
    document.cookie = "_xsrf=" + hex + "; path=/; SameSite=Strict" + (location.protocol === "https:" ? "; Secure" : "");
  }
  if (window.harUploadGuard) return;
  window.harUploadGuard = true;
  var original = FileReader.prototype.readAsArrayBuffer;
  var used = 0, scheduled = false;
  FileReader.prototype.readAsArrayBuffer = function (blob) {
    if (!scheduled) { scheduled = true; setTimeout(function () { used = 0; scheduled = false; }, 0); }
    var size = (blob && blob.size) || 0, lim = window.harUploadLimits;
    if (size > lim.file || used + size > lim.batch) { return original.call(this, blob.slice(0, 0)); }
    used += size;
    return original.call(this, blob);
  };
  watchConnection();

  function watchConnection() {
    // A page that shows no dashboard this long after its cells arrived has failed: Jupyter gives a kernel 60 s to
    // answer a new websocket, and a busy host needs some of that.
    var CONNECT_LIMIT_MS = 75000;
    var RELOADS = 2, RELOAD_DELAY_MS = 2000;
    var KEY = "harReloads:" + location.pathname;
    var PROBE_EVERY_MS = 5000;
    var started = Date.now(), shown = false, probed = 0;
    // The widget's text form (a Python repr) is never what a visitor should read: hidden from the first moment.
    var style = document.createElement("style");
    style.textContent = '#rendered_cells [data-mime-type="text/plain"] { display: none !important; }';
    document.head.appendChild(style);
    var timer = setInterval(check, 500);

    function store() { try { return window.sessionStorage; } catch (e) { return null; } }

    function kernelOf(app) {
      var manager = app && app.widgetManager;
      return manager && manager.kernel;
    }

    function check() {
      if (document.querySelector(".har-app")) {
        // The dashboard (or its own start-up message) is on screen: this page reached its kernel.
        if (!shown) { shown = true; var s = store(); if (s) s.removeItem(KEY); }
        var kernel = kernelOf(window.jupyterapp);
        if (!kernel || kernel.connectionStatus === "connected") return;
        if (kernel.connectionStatus === "disconnected" || kernel.status === "dead") { lost(); return; }
        // Reconnecting: a network hiccup heals by itself, but a kernel the server shut down (an idle tab evicted
        // for a new visitor, or culled) never comes back, and the page would retry for minutes. Ask the server.
        if (Date.now() - probed < PROBE_EVERY_MS) return;
        probed = Date.now();
        var url = baseUrl() + "api/kernels/" + encodeURIComponent(kernel.id);
        fetch(url, {credentials: "same-origin", cache: "no-store"})
          .then(function (r) { if (r.status === 404) lost(); }, function () {});
        return;
      }
      var app = window.jupyterapp;
      var noKernel = app && app.name === "Voila" && !kernelOf(app);  // Voila found no kernel for this page
      var cells = document.getElementById("rendered_cells");
      var widgetText = cells && cells.querySelector('[data-mime-type="text/plain"]');
      var widgetError = /Error displaying widget/.test((cells && cells.textContent) || "");
      if (noKernel || widgetError || (widgetText && app) || Date.now() - started > CONNECT_LIMIT_MS) {
        clearInterval(timer);
        retry();
      }
    }

    function baseUrl() {
      try {
        return JSON.parse(document.getElementById("jupyter-config-data").textContent).baseUrl || "/";
      } catch (e) { return "/"; }
    }

    function lost() {
      clearInterval(timer);
      notice("lost", "This page lost its connection to the dashboard's server (it was idle for a long time, or the "
        + "server restarted). Reload the page to go on.", true);
    }

    function retry() {
      var s = store(), done = s ? parseInt(s.getItem(KEY) || "0", 10) : RELOADS;
      if (done < RELOADS) {
        s.setItem(KEY, String(done + 1));
        notice("retry", "The dashboard could not connect to its server session. Trying again ("
          + (done + 1) + " of " + RELOADS + ")…", false);
        setTimeout(function () { location.reload(); }, RELOAD_DELAY_MS);
        return;
      }
      if (s) s.removeItem(KEY);
      notice("failed", "The dashboard could not connect to its server session. The server may be busy: please "
        + "reload the page in a minute.", true);
    }

    function notice(state, message, button) {
      var box = document.getElementById("har-connection");
      if (!box) {
        box = document.createElement("div");
        box.id = "har-connection";
        box.setAttribute("role", "alert");
        box.style.cssText = "margin:12px;padding:10px 12px;border-left:4px solid #d73a49;background:#fdecee;"
          + "font:14px system-ui,sans-serif;max-width:960px";
        var cells = document.getElementById("rendered_cells");
        (cells && cells.parentNode ? cells.parentNode : document.body).insertBefore(box, cells || null);
      }
      box.className = "har-connection";
      box.setAttribute("data-state", state);
      box.textContent = message + " ";
      if (button) {
        var b = document.createElement("button");
        b.textContent = "Reload";
        b.className = "har-reload";
        b.onclick = function () { location.reload(); };
        box.appendChild(b);
      }
    }
  }
})();
