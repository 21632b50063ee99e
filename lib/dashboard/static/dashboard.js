// Browser side of the dashboard page (loaded by lib/dashboard/app.py, limits filled in there).
// Upload guard: a file over the cap (or past the batch budget) is read as zero bytes, so the websocket never
// carries an oversize message (tornado would drop the connection) and the kernel answers with a message.
// Kernel release: Voila 0.5 shuts a visitor's kernel down with a beforeunload beacon carrying the _xsrf
// cookie, which its page never sets (voila-dashboards/voila#1458: 403, the kernel lives until culled).
// A random token in that cookie satisfies tornado's double-submit check and lets the beacon through.
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
})();
