"""A dashboard page that counts each run's chunks through every task group, over the whole run.

Dask's own progress bars count the tasks the scheduler still knows. A run drops each
chunk's tasks as soon as the chunk is written (so a lost worker never makes it compute
a written chunk again), and a pipeline submits its chunks through a window, so those
bars show only what is in flight. :class:`ProgressPage` is a scheduler plugin that
counts every finished task of a run's groups (``read``, ``s0_resnet50``, ..., ``write``)
and serves them, against the chunks the run has to do, at ``/dask-infer/progress`` on
the scheduler's dashboard (``/dask-infer/progress.json`` for scripts).

A run registers itself in the scheduler's metadata (``dask-infer``/``runs``): its model,
chunks and images to do, and the graph tokens its keys carry (a re-cut or re-placement
starts new ones). The plugin keeps counts per token, so the run's tasks are counted from
the first even if they finish before the run names their token.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, Future
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

__all__ = ["PAGE", "ProgressPage", "RunBoard", "page_url", "run_progress"]

PAGE = "/dask-infer/progress"
_DATA = PAGE + ".json"
_RUNS = ["dask-infer", "runs"]
_KEY = re.compile(r"^([0-9A-Za-z_]+)-([0-9a-f]{32})-(\d+)$")
_TOKENS_KEPT = 256


class ProgressPage(SchedulerPlugin):
    """Counts finished tasks per graph token and task group; serves the progress page.

    Only the ``_TOKENS_KEPT`` most recently active tokens are kept, so a long-lived
    scheduler holds a bounded amount.
    """

    name = "dask-infer-progress"
    idempotent = True

    def __init__(self) -> None:
        self.counts: OrderedDict[str, Counter[str]] = OrderedDict()
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        """Add the page's two routes to the scheduler's HTTP server (where it has one)."""
        self.scheduler = scheduler
        app = getattr(scheduler, "http_application", None)
        if app is not None:
            app.add_handlers(r".*", [(_DATA, _DataHandler, {"page": self}), (PAGE, _PageHandler)])

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Count a task of a run's graph reaching memory."""
        if finish != "memory" or not isinstance(key, str):
            return
        match = _KEY.match(key)
        if match is None:
            return
        group, token = match.group(1), match.group(2)
        counts = self.counts.get(token)
        if counts is None:
            counts = self.counts[token] = Counter()
            while len(self.counts) > _TOKENS_KEPT:
                self.counts.popitem(last=False)
        else:
            self.counts.move_to_end(token)
        counts[group] += 1

    def runs(self) -> list[dict[str, Any]]:
        """Every registered run, newest first, with its groups' finished chunks."""
        registered = self.scheduler.get_metadata(keys=_RUNS, default={}) if self.scheduler else {}
        out = []
        for run_id, run in registered.items():
            groups: Counter[str] = Counter()
            for token in run.get("tokens", ()):
                groups.update(self.counts.get(token, {}))
            out.append({"id": run_id, **run, "groups": _ordered(groups)})
        return sorted(out, key=lambda r: r.get("started", 0.0), reverse=True)


def _ordered(groups: Counter[str]) -> list[dict[str, Any]]:
    """Groups in the order a chunk meets them: read, the model's (stage by stage), write."""

    def rank(name: str) -> tuple[int, int, str]:
        if name == "read":
            return (0, 0, name)
        if name == "write":
            return (2, 0, name)
        stage = re.match(r"^s(\d+)_", name)
        return (1, int(stage.group(1)) if stage else -1, name)

    return [{"name": name, "done": groups[name]} for name in sorted(groups, key=rank)]


class _DataHandler(web.RequestHandler):
    def initialize(self, page: ProgressPage) -> None:
        self.page = page

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write({"now": time.time(), "runs": self.page.runs()})


class _PageHandler(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(_HTML)


def page_url(dashboard: str | None) -> str | None:
    """The progress page's address beside the dashboard at ``dashboard`` (its ``/status`` link)."""
    if not dashboard:
        return None
    base = dashboard.rsplit("/status", 1)[0] if dashboard.endswith("/status") else dashboard.rstrip("/")
    return base + PAGE


def run_progress(client: Client) -> list[dict[str, Any]]:
    """What the page shows, read from the scheduler: every run, newest first (``[]`` without the plugin)."""

    def read(dask_scheduler: Any) -> list[dict[str, Any]]:
        plugin = dask_scheduler.plugins.get(ProgressPage.name)
        return plugin.runs() if plugin is not None else []

    return client.run_on_scheduler(read)


class RunBoard:
    """One run's entry on the progress page: registered at start, its tokens as they appear, its end.

    Parameters
    ----------
    client
        The run's client.
    label
        The model's name, as the run prints it.
    chunks, images
        What the run has to do (chunks already written by a resumed run excluded).
    say
        Where the page's address (or why there is none) is told.
    dashboard
        The dashboard's link, from which the page's address follows.
    """

    def __init__(
        self,
        client: Client,
        *,
        label: str,
        chunks: int,
        images: int,
        say: Callable[[str], None],
        dashboard: str | None,
    ) -> None:
        self.client = client
        self.run_id = uuid.uuid4().hex[:12]
        self.tokens: list[str] = []
        self.entry: dict[str, Any] = {
            "label": label,
            "chunks": chunks,
            "images": images,
            "started": time.time(),
            "finished": None,
            "status": "running",
            "tokens": self.tokens,
        }
        try:
            client.register_plugin(ProgressPage())
        except Exception as exc:  # a scheduler without dask-infer cannot unpickle the plugin
            self.url = None
            why = type(exc).__name__
            say(f"no progress page: the scheduler could not load it ({why}); install dask-infer there")
            return
        self.url = page_url(dashboard)
        self._publish()
        if self.url:
            say(f"progress: {self.url}")

    def _publish(self) -> None:
        self.client.set_metadata([*_RUNS, self.run_id], dict(self.entry, tokens=list(self.tokens)))

    def watch(self, submit: Callable[[list[int]], list[Future]]) -> Callable[[list[int]], list[Future]]:
        """``submit``, naming to the page each graph token its futures' keys bring."""
        if self.url is None:
            return submit

        def submitted(indices: list[int]) -> list[Future]:
            futures = submit(indices)
            self.add_tokens(str(f.key) for f in futures)
            return futures

        return submitted

    def add_tokens(self, keys: Sequence[str] | Any) -> None:
        """Name the tokens of ``keys`` (``{group}-{token}-{chunk}``) not named yet."""
        new = []
        for key in keys:
            match = _KEY.match(key)
            if match and match.group(2) not in self.tokens and match.group(2) not in new:
                new.append(match.group(2))
        if new:
            self.tokens.extend(new)
            self._publish()

    def finish(self, status: str) -> None:
        """Mark the run ``status`` (``finished``, ``failed``, ``interrupted``) with its end time."""
        if self.url is None:
            return
        self.entry.update(status=status, finished=time.time())
        # The cluster may be what failed; the run's own error is what the user must see.
        with contextlib.suppress(Exception):
            self._publish()


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dask-infer progress</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin:1.2em 0 .3em}
.meta{color:#555;font-size:.9em}
.row{display:flex;align-items:center;margin:.25em 0}
.name{width:14em;font-family:monospace;font-size:.9em}
.bar{flex:1;max-width:40em;height:1.1em;background:#eee;border-radius:3px;overflow:hidden}
.fill{height:100%;background:#3b7dd8}
.count{width:9em;text-align:right;font-family:monospace;font-size:.9em}
.finished .fill{background:#2e9e4f}.failed .fill,.interrupted .fill{background:#c0392b}
</style></head>
<body><h1>dask-infer: chunks through each task group, over the whole run</h1>
<p class="meta">Each bar counts the chunks a task group has finished against the chunks the run has
to do, from the run's start (Dask's own progress bars show only the tasks still in flight).</p>
<div id="runs">waiting for the scheduler...</div>
<script>
function fmt(s){s=Math.max(0,Math.round(s));return s<60?s+" s":Math.floor(s/60)+" min "+(s%60)+" s"}
function draw(data){
  const root=document.getElementById("runs");root.textContent="";
  if(!data.runs.length){root.textContent="no run yet";return}
  for(const run of data.runs){
    const box=document.createElement("div");box.className=run.status;
    const end=run.finished||data.now,took=end-run.started;
    const written=(run.groups.find(g=>g.name==="write")||{done:0}).done;
    const rate=took>0?Math.round(run.images*Math.min(written,run.chunks)/Math.max(run.chunks,1)/took):0;
    box.innerHTML="<h2></h2><div class='meta'></div>";
    box.querySelector("h2").textContent=run.label+" \\u2014 "+run.status;
    box.querySelector(".meta").textContent=run.chunks+" chunks, "+run.images+" images; "+fmt(took)+
      ", about "+rate+" images/s";
    for(const g of run.groups){
      const row=document.createElement("div");row.className="row";
      const pct=Math.min(100,100*g.done/Math.max(run.chunks,1));
      row.innerHTML="<span class='name'></span><span class='bar'><div class='fill'></div></span>"+
        "<span class='count'></span>";
      row.querySelector(".name").textContent=g.name;
      row.querySelector(".fill").style.width=pct+"%";
      row.querySelector(".count").textContent=g.done+" / "+run.chunks;
      box.appendChild(row);
    }
    root.appendChild(box);
  }
}
async function poll(){
  try{const r=await fetch("progress.json",{cache:"no-store"});draw(await r.json())}catch(e){}
  setTimeout(poll,1000);
}
poll();
</script></body></html>
"""
