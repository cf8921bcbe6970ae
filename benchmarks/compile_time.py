"""Compile time of a pruned train step against adam's, as models get deep.

Run as ``python -m benchmarks.compile_time``. Each configuration runs in a
fresh process (no compilation cache, nothing warm): it builds a model's
params, lowers and compiles one jitted train step (forward, backward,
``optax.chain(optax.adam(1e-3), <pruning link>)``, ``apply_updates``),
samples the process's resident memory every 10 ms meanwhile, then times the
compiled step on a step without a mask update and on one with it (minimum of
``--repeats``). A configuration past ``--limit`` seconds is killed and
reported as "did not finish".

Models: an MLP of L 256x256 kernels plus biases (L pruned leaves; the depth
sweep), a ResNet-50-shaped CNN (53 convolutions with BatchNorm, the real
widths, 32x32 inputs) and a 12-layer transformer (d=256, 4 heads: 72 pruned
kernels), unscanned and scanned (``nn.scan``: 6 pruned leaves of 12 layers
each, pruned per layer with ``layer_axis``). Every configuration of the pruning link (threshold methods,
distributions, scopes, structured units, sparse training) runs at the
deepest MLP; the sweep runs adam and the defaults at every depth.

Prints a table, saves ``benchmarks/results/compile_time.json`` and a log-log
plot of compile time against pruned leaves (``compile_time.png``). With
``--source DIR`` the children import optax_prune from another checkout
(``git worktree add /tmp/old <commit>``), to compare with an older commit
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from benchmarks import _common

SCHEDULE = dict(final_sparsity=0.9, begin_step=0, end_step=100, frequency=10)
DEPTHS = (8, 16, 32, 64, 128)
# Pruning links by name: keyword arguments of `magnitude_pruning`, or a
# sparse-training factory. None is adam alone.
LINKS = {
    "adam": None,
    "default": {},
    # The defaults in a step compiled without the mask update
    # (`update_masks=False`): what the rest of the pruning link costs.
    "default-no-mask-update": dict(update_masks=False),
    "erk-sort": dict(threshold="sort"),
    "erk-bisect": dict(threshold="bisect"),
    "erk-histogram": dict(threshold="histogram"),
    "uniform": dict(distribution="uniform"),
    "uniform-sort": dict(distribution="uniform", threshold="sort"),
    "uniform-bisect": dict(distribution="uniform", threshold="bisect"),
    "uniform-histogram": dict(distribution="uniform", threshold="histogram"),
    "global": dict(scope="global"),
    "2:4": dict(granularity="2:4"),
    "blocks": dict(granularity="blocks"),
    "channels": dict(granularity="channels"),
    "saliency": dict(score="saliency"),
    "packed": dict(packed_masks=True),
    "rigl": "rigl",
    "set": "set",
    "static_sparse": "static_sparse",
    "straight_through": "straight_through",
}


# --------------------------------------------------------------------------
# The child: one configuration in this process.

def _models():
  import flax.linen as nn
  import jax.numpy as jnp

  class MLP(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, x, train=True):
      for _ in range(self.depth):
        x = nn.tanh(nn.Dense(256)(x))
      return x

  class Bottleneck(nn.Module):
    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train):
      norm = lambda: nn.BatchNorm(use_running_average=not train)
      y = nn.relu(norm()(nn.Conv(self.features, (1, 1))(x)))
      y = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.strides)(y)))
      y = norm()(nn.Conv(4 * self.features, (1, 1))(y))
      if x.shape[-1] != y.shape[-1] or self.strides != 1:
        x = norm()(nn.Conv(4 * self.features, (1, 1), self.strides)(x))
      return nn.relu(x + y)

  class ResNet50(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(
          nn.Conv(64, (7, 7), 2)(x)))
      for stage, blocks in enumerate((3, 4, 6, 3)):
        for block in range(blocks):
          x = Bottleneck(64 * 2**stage, 2 if block == 0 and stage else 1)(x, train)
      return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = x + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(x))
      return x + nn.Dense(256)(nn.gelu(nn.Dense(1024)(nn.LayerNorm()(x))))

  class Transformer(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      for _ in range(12):
        x = Block()(x, train)
      return x

  class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return Block()(x, True), None

  class ScannedTransformer(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      del train  # As in `Block`: no dropout.
      stack = nn.scan(ScannedBlock, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=12)
      return stack(name="layers")(x, None)[0]

  return {"mlp": (MLP, (8, 256)), "resnet50": (ResNet50, (2, 32, 32, 3)),
          "transformer12": (Transformer, (2, 16, 256)),
          "transformer12_scanned": (ScannedTransformer, (2, 16, 256))}


# `layer_axis` of the scanned model: its stacked leaves' leading axis.
SCANNED = {"transformer12_scanned"}


def _link(name: str, params, scanned: bool = False):
  import jax
  import optax
  import optax_prune

  schedule = optax_prune.polynomial_schedule(**SCHEDULE)
  spec = LINKS[name]
  if spec is None:
    return optax.adam(1e-3)
  stack = dict(layer_axis=optax_prune.by_path({r"\['layers'\]": 0}, default=None)
               if scanned else None)
  if isinstance(spec, str):  # Sparse training: the wrapper owns the optimizer.
    factory = {"rigl": optax_prune.rigl, "set": optax_prune.set_training}.get(spec)
    if factory:
      return factory(optax.adam(1e-3), 0.9, end_step=100, frequency=10, **stack)
    link = (optax_prune.static_sparse(0.9, **stack) if spec == "static_sparse"
            else optax_prune.straight_through(schedule, **stack))
    return optax.chain(optax.adam(1e-3), link)
  kwargs = dict(spec, **stack)
  kwargs.pop("update_masks", None)  # A keyword of `update`, not of the link.
  structured = {
      "2:4": lambda x: optax_prune.n_of_m(2, 4, axis=-2),
      "blocks": lambda x: optax_prune.blocks((4, 4)),
      "channels": lambda x: optax_prune.channels(),
  }.get(kwargs.get("granularity"))
  if structured:
    kwargs["granularity"] = jax.tree.map(
        lambda x: structured(x) if x.ndim >= 2 and x.shape[-2] % 4 == 0 else None, params)
  return optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(schedule, **kwargs))


def _rss() -> int:
  """Resident memory of this process, bytes (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
  """Samples resident memory every 10 ms while in the `with` block."""

  def __enter__(self):
    self.base = self.peak = _rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.01):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())

  @property
  def rise(self) -> int:
    return self.peak - self.base


def run_one(model: str, depth: int, link: str, repeats: int) -> dict:
  """Compiles and times one configuration in this process."""
  import jax
  import jax.numpy as jnp
  import optax
  import optax_prune

  jax.config.update("jax_enable_compilation_cache", False)
  module_type, input_shape = _models()[model]
  module = module_type(depth) if model == "mlp" else module_type()
  x = jnp.ones(input_shape)
  variables = module.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  stats = {k: v for k, v in variables.items() if k != "params"}
  tx = _link(link, params, scanned=model in SCANNED)
  spec = LINKS[link]
  update_kwargs = ({"update_masks": spec["update_masks"]}
                   if isinstance(spec, dict) and "update_masks" in spec else {})
  opt_state = tx.init(params)

  def loss(params, stats, x):
    out, updates = module.apply({"params": params, **stats}, x, train=True,
                                mutable=list(stats))
    return jnp.mean(out ** 2), updates

  def step(params, stats, opt_state, x):
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x)
    updates, opt_state = tx.update(grads, opt_state, params, **update_kwargs)
    return optax.apply_updates(params, updates), stats, opt_state

  with _PeakRss() as memory:
    start = time.perf_counter()
    lowered = jax.jit(step).lower(params, stats, opt_state, x)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
  pruned = len([m for m in jax.tree.leaves(_masks(opt_state))])

  def at_count(count):  # The state with every pruning state's count set.
    is_state = lambda s: isinstance(s, optax_prune.MagnitudePruningState)
    return jax.tree.map(lambda s: s._replace(count=jnp.asarray(count, jnp.int32))
                        if is_state(s) else s, opt_state, is_leaf=is_state)

  timings = {}
  if link != "adam":
    # Step 5 is not a mask update of the schedule (every 10 steps); step 50 is.
    fns = {"no_update": lambda s=at_count(5): compiled(params, stats, s, x),
           "update": lambda s=at_count(50): compiled(params, stats, s, x)}
  else:
    fns = {"no_update": lambda: compiled(params, stats, opt_state, x)}
  timings = _common.time_side_by_side(fns, repeats, statistic=min)
  return dict(model=model, depth=depth, link=link, pruned_leaves=pruned,
              params=int(sum(v.size for v in jax.tree.leaves(params))),
              lower_s=lower_s, compile_s=compile_s, compile_rss_rise_mb=memory.rise / 2**20,
              hlo_chars=len(compiled.as_text()),
              temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
              step_ms=timings["no_update"] * 1e3,
              update_step_ms=timings.get("update", float("nan")) * 1e3,
              jax=jax.__version__, source=str(pathlib.Path(optax_prune.__file__).parent.parent))


def _masks(opt_state):
  """The pruned leaves' masks of the (first) pruning state; [] for adam."""
  import jax
  import optax_prune
  is_state = lambda s: isinstance(s, optax_prune.MagnitudePruningState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
  return jax.tree.leaves(states[0].masks) if states else []


# --------------------------------------------------------------------------
# The parent: one fresh process per configuration.

def configurations(quick: bool, depths: Optional[Sequence[int]] = None,
                   links: Optional[Sequence[str]] = None,
                   models: Optional[Sequence[str]] = None) -> list[tuple[str, int, str]]:
  """The sweep: adam and the defaults at every depth, every link at the
  deepest, and the CNN and transformers. ``depths`` and ``links`` narrow it to
  the MLP at those depths with those links (adam always included); ``models``
  runs every link (or ``links``) on those models instead."""
  if models:
    return [(m, 0, link) for m in models for link in (links or LINKS)]
  if depths or links:
    chosen = ["adam"] + [k for k in (links or ("default",)) if k != "adam"]
    return [("mlp", d, link) for d in (depths or DEPTHS) for link in chosen]
  if quick:  # What the targets need, at the smallest depths: adam, the defaults' growth.
    return [("mlp", 2, "default"), ("mlp", 4, "adam"), ("mlp", 4, "default")]
  out = [("mlp", d, link) for d in DEPTHS for link in ("adam", "default")]
  out += [("mlp", DEPTHS[-1], link) for link in LINKS if link not in ("adam", "default")]
  out += [(m, 0, link) for m in ("resnet50", "transformer12", "transformer12_scanned")
          for link in ("adam", "default", "uniform", "erk-histogram")]
  return out


def run_child(model, depth, link, repeats, limit, source: Optional[str]) -> dict:
  # `-c`, so that `source` comes first on the path before anything imports optax_prune.
  start = (f"import sys; sys.path.insert(0, {str(pathlib.Path(source).resolve())!r}); "
           "import optax_prune; del sys.path[0]; " if source else "")
  command = [sys.executable, "-c", start + "import runpy; runpy.run_module("
             "'benchmarks.compile_time', run_name='__main__')", "--child",
             json.dumps([model, depth, link, repeats])]
  record = dict(model=model, depth=depth, link=link)
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
  except subprocess.TimeoutExpired:
    return {**record, "status": f"did not finish in {limit:.0f} s"}
  if done.returncode:
    return {**record, "status": "failed: " + done.stderr.strip().splitlines()[-1][:200]}
  return {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}


def targets(records: Sequence[dict]) -> list[tuple[str, bool, str]]:
  """The issue's targets, each (what, met, the figures)."""
  ok = {(r["model"], r["depth"], r["link"]): r for r in records if r.get("status") == "ok"}
  out = []
  deepest = max((r["depth"] for r in records if r["model"] == "mlp"), default=0)
  adam = ok.get(("mlp", deepest, "adam"))
  if adam:
    for key, r in ok.items():
      if key[0] != "mlp" or key[1] != deepest or key[2] == "adam":
        continue
      factor, extra = (3, 1.0) if key[2] == "default" else (5, 2.0)
      bound = factor * adam["compile_s"] + extra
      out.append((f"mlp-{deepest} {key[2]}: compile <= {factor}x adam + {extra:.0f} s",
                  r["compile_s"] <= bound, f"{r['compile_s']:.2f} s <= {bound:.2f} s"))
      out.append((f"mlp-{deepest} {key[2]}: compile RSS rise <= 2x adam's",
                  r["compile_rss_rise_mb"] <= 2 * adam["compile_rss_rise_mb"],
                  f"{r['compile_rss_rise_mb']:.0f} MB vs {adam['compile_rss_rise_mb']:.0f} MB"))
    half = ok.get(("mlp", deepest // 2, "default"))
    full = ok.get(("mlp", deepest, "default"))
    if half and full:
      growth = full["compile_s"] / half["compile_s"]
      out.append((f"default compile growth {deepest // 2} -> {deepest} leaves <= 2.2x",
                  growth <= 2.2, f"{growth:.2f}x"))
  cnn_adam, cnn = ok.get(("resnet50", 0, "adam")), ok.get(("resnet50", 0, "default"))
  if cnn_adam and cnn:
    bound = 3 * cnn_adam["compile_s"] + 2
    out.append(("resnet50 default: compile <= 3x adam + 2 s", cnn["compile_s"] <= bound,
                f"{cnn['compile_s']:.2f} s <= {bound:.2f} s"))
  scan_adam = ok.get(("transformer12_scanned", 0, "adam"))
  for link in ("default", "uniform", "erk-histogram"):
    scanned = ok.get(("transformer12_scanned", 0, link))
    if scan_adam and scanned:
      bound = 1.5 * scan_adam["compile_s"]
      out.append((f"scanned transformer12 {link} (per layer): compile <= 1.5x adam",
                  scanned["compile_s"] <= bound, f"{scanned['compile_s']:.2f} s <= {bound:.2f} s"))
  return out


def plot(records: Sequence[dict], path: pathlib.Path,
         before: Optional[Sequence[dict]] = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not any(r["model"] == "mlp" for r in records):  # `--models`: bars per link.
    done = [r for r in records if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(done) + 1))
    ax.barh([f"{r['model']} {r['link']}" for r in done], [r["compile_s"] for r in done])
    ax.invert_yaxis()
    ax.set_xlabel("train step compile time (s)")
    ax.set_title("Compile time per pruning link (CPU)")
    _common.save_figure(fig, path)
    return
  fig, ax = plt.subplots(figsize=(8, 4))
  for link in ("adam", "default"):
    points = sorted((r["pruned_leaves"] if link != "adam" else r["depth"], r["compile_s"])
                    for r in records if r.get("status") == "ok" and r["model"] == "mlp"
                    and r["link"] == link)
    if points:
      ax.loglog(*zip(*points), "o-", label=link)
  if before:  # An older checkout's defaults, with "did not finish" at its limit.
    done = sorted((r["depth"], r["compile_s"]) for r in before
                  if r["model"] == "mlp" and r["link"] == "default" and r.get("status") == "ok")
    if done:
      ax.loglog(*zip(*done), "s--", color="tab:red", label="default, before")
    unfinished = [r["depth"] for r in before if r["model"] == "mlp" and r["link"] == "default"
                  and r.get("status", "").startswith("did not finish")]
    if unfinished:
      limit = float(before_limit(before))
      ax.loglog(unfinished, [limit] * len(unfinished), "^", color="tab:red",
                label=f"before: did not finish in {limit:.0f} s")
  deepest = [r for r in records if r.get("status") == "ok" and r["model"] == "mlp"
             and r["link"] not in ("adam", "default")]
  if deepest:
    ax.loglog([r["pruned_leaves"] for r in deepest], [r["compile_s"] for r in deepest],
              "x", color="gray", label="other links")
  ax.set_xlabel("pruned leaves (MLP of 256x256 kernels)")
  ax.set_ylabel("train step compile time (s)")
  ax.set_title("Compile time against depth (CPU)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
  ax.grid(True, which="both", alpha=0.3)
  _common.save_figure(fig, path)


def before_limit(records: Sequence[dict]) -> float:
  """The time limit written in a "did not finish in N s" status."""
  for r in records:
    if r.get("status", "").startswith("did not finish in "):
      return float(r["status"].split()[4])
  return float("nan")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help="adam and the defaults at depths 2 and 4 (the smoke test)")
  parser.add_argument("--repeats", type=int, default=20, help="step timings (minimum)")
  parser.add_argument("--limit", type=float, default=300.0,
                      help="seconds per configuration before 'did not finish'")
  parser.add_argument("--source", help="import optax_prune from this checkout")
  parser.add_argument("--depths", type=int, nargs="*", help="only the MLP at these depths")
  parser.add_argument("--links", nargs="*", choices=list(LINKS), help="only these links")
  parser.add_argument("--models", nargs="*", choices=["resnet50", "transformer12",
                                                      "transformer12_scanned"],
                      help="every link (or --links) on these models, not the MLP sweep")
  parser.add_argument("--before", help="a JSON of an earlier run (--source), drawn in the plot")
  parser.add_argument("--out", default=str(_common.RESULTS / "compile_time.json"))
  parser.add_argument("--plot", default=str(_common.RESULTS / "compile_time.png"))
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(run_one(*json.loads(args.child))))
    return []

  from tqdm import tqdm
  records = []
  progress = tqdm(configurations(args.quick, args.depths, args.links, args.models),
                  desc="configurations")
  for model, depth, link in progress:
    progress.set_postfix_str(f"{model} {depth or ''} {link}")
    records.append(run_child(model, depth, link, args.repeats, args.limit, args.source))
  rows = [[r["model"], str(r["depth"] or ""), r["link"], str(r.get("pruned_leaves", "")),
           *(f"{r[k]:.2f}" if r.get("status") == "ok" else "-"
             for k in ("compile_s", "compile_rss_rise_mb", "step_ms", "update_step_ms")),
           f"{r['hlo_chars'] / 1e3:.0f}k" if r.get("status") == "ok" else "-",
           r["status"]] for r in records]
  print(_common.table(rows, ["model", "depth", "link", "pruned", "compile s", "RSS rise MB",
                             "step ms", "update step ms", "HLO", "status"]))
  checks = targets(records)
  print(_common.table([[what, "yes" if met else "NO", figures] for what, met, figures in checks],
                      ["target", "met", "figures"]))
  _common.write_json(pathlib.Path(args.out), records, schedule=SCHEDULE,
                     targets=[dict(target=t, met=m, figures=f) for t, m, f in checks])
  before = json.loads(pathlib.Path(args.before).read_text())["records"] if args.before else None
  plot(records, pathlib.Path(args.plot), before)
  return records


if __name__ == "__main__":
  main()
