// vmvault dashboard: live job progress through server-sent events. Text is only ever set
// with textContent (never as HTML), so nothing from a job name or a phase label can run.
"use strict";
(function () {
  function render(states) {
    states.forEach(function (s) {
      var boxes = document.querySelectorAll("[data-progress]");
      boxes.forEach(function (box) {
        if (box.getAttribute("data-progress") !== s.job) { return; }
        var bar = box.querySelector("progress");
        var pct = box.querySelector(".pct");
        var phase = box.querySelector(".phase");
        if (bar) { bar.value = s.percent === null ? 0 : s.percent; }
        if (pct) {
          var text = s.state + (s.percent === null ? "" : " " + Math.round(s.percent) + " %");
          if (s.status) { text += " (" + s.status + ")"; }
          pct.textContent = text;
        }
        if (phase) { phase.textContent = s.phase || ""; }
        box.setAttribute("data-state", s.state);
      });
      document.querySelectorAll("[data-stop-of]").forEach(function (form) {
        if (form.getAttribute("data-stop-of") === s.job) { form.hidden = s.state !== "running" && s.state !== "queued"; }
      });
      if (s.state === "finished" && s.status) {
        document.querySelectorAll("[data-status-of]").forEach(function (cell) {
          if (cell.getAttribute("data-status-of") !== s.job) { return; }
          cell.textContent = s.status;
          cell.className = "status " + s.status.replace(/[^a-z]/g, "");
        });
      }
    });
  }
  function listen() {
    if (!document.querySelector("[data-progress]") || !window.EventSource) { return; }
    var source = new EventSource("/api/v1/events");
    source.addEventListener("progress", function (event) {
      try { render(JSON.parse(event.data)); } catch (e) { /* a bad event is ignored */ }
    });
  }
  document.addEventListener("DOMContentLoaded", listen);
})();
