"""Which tracer captures a model, and why: a pure function of what a symbolic attempt saw.

:func:`decide` reads an :class:`Attempt` (what ``torch.fx`` met while tracing the model:
a failure and where, hazards, hooks and on which modules, custom autograd functions,
whether example inputs are at hand, the ``fallback`` option) and returns a
:class:`Decision`: the tracer, the reason ``explain()`` gives, and the modules that run
as *eager leaves* inside the graph (one ``call_module`` node each, run by
``nn.Module.__call__``, so their hooks run as the model runs them).

The rules, in order:

1. ``fallback="always"``, or global module hooks: everything at run time.
2. fx traced the model and nothing it did differs from the model (modules with hooks or
   custom autograd functions are eager leaves): the symbolic graph.
3. A module whose hooks must run as the model runs them (or the root's own hooks), or
   that calls a custom autograd function: the running tracer (``torch.export``) would
   run them once, at trace time; keep fx's graph with its failed modules as eager
   leaves too, or run at run time what fx could not.
4. Otherwise the running tracer, on the example inputs (``later`` without them);
   where it fails too, fx's graph with eager leaves, or run time.

With ``fallback="never"`` a step that would leave part of the model eager raises
instead (``raise``). No step looks at the model itself: the table in
``tests/core/test_policy.py`` covers them.

Example::

    >>> decide(Attempt(traced=True, hooks={"blocks.0": "forward hook log"}))
    Decision(tracer='symbolic', reason="torch.fx traces it exactly; eager leaves: 'blocks.0' (forward hook log)", ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

SYMBOLIC, RUNNING, RUN_TIME = "symbolic", "running", "run time"
LATER = "later"  # the running tracer, once example inputs are given (the first call)
RAISE = "raise"  # fallback="never" and no tracer is exact


@dataclass(frozen=True)
class Attempt:
    """What a symbolic attempt saw (all plain values: no model, no graph).

    Attributes:
        fallback: ``"auto"``, ``"never"`` or ``"always"``.
        traced: fx produced a graph (with ``failed`` modules as leaves).
        failure: the first line of fx's error where it failed in the model's own
            forward (nothing could be traced), else ``None``.
        failed: ``{module path: first line of the error}`` for submodules fx could not
            trace (each became a leaf and the trace was retried).
        hazards: what the graph would do differently from the model (``"torch.no_grad()"``,
            ``"forward assigns blocks.0.cache"``...).
        hooks: ``{module path: "forward hook name, ..."}`` for submodules with user hooks.
        root_hooks: the model itself has user hooks.
        global_hooks: global module hooks are registered.
        eager_calls: ``{module path: what it does}`` for modules fx saw doing what only
            an eager call keeps (``"calls autograd.Function F.apply"``, ``"keeps Python
            state (calls)"``; ``""``: the model's own forward).
        has_example: example inputs are at hand (the running tracer can run now).
        running_failure: the first line of the running tracer's error, once tried.
    """

    fallback: str = "auto"
    traced: bool = False
    failure: str | None = None
    failed: dict[str, str] = field(default_factory=dict)
    hazards: tuple[str, ...] = ()
    hooks: dict[str, str] = field(default_factory=dict)
    root_hooks: bool = False
    global_hooks: bool = False
    eager_calls: dict[str, str] = field(default_factory=dict)
    has_example: bool = False
    running_failure: str | None = None

    def eager_leaves(self) -> dict[str, str]:
        """Submodules that run eagerly inside a graph however it is traced, with why."""
        leaves = {path: f"{how}: runs as the model runs it" for path, how in self.hooks.items()}
        leaves.update(
            (path, f"{why}: runs eagerly") for path, why in self.eager_calls.items() if path
        )
        return leaves

    def problems(self) -> list[str]:
        """Why fx's graph is not the model: hazards, failures, a custom function at the root."""
        found = list(self.hazards)
        if "" in self.eager_calls:
            found.append(f"the model's forward {self.eager_calls['']}")
        if self.failure is not None:
            found.append(f"the model: {self.failure}")
        found += [f"{path}: {why}" for path, why in self.failed.items()]
        return found


@dataclass(frozen=True)
class Decision:
    """The tracer, why (as ``explain()`` says it), and the modules run as eager leaves.

    ``eager_leaves`` holds ``{module path: why}``; ``{"": why}`` with tracer
    ``"run time"`` means the whole model runs eagerly.
    """

    tracer: str
    reason: str
    eager_leaves: dict[str, str] = field(default_factory=dict)


def _listed(leaves: dict[str, str]) -> str:
    return ", ".join(f"{path!r} ({why.partition(':')[0]})" for path, why in leaves.items())


def _whole(reason: str) -> Decision:
    return Decision(RUN_TIME, reason, {"": reason})


def _fx_with_eager_leaves(attempt: Attempt, why: str) -> Decision:
    """fx's graph with the modules it failed on as eager leaves, if it is exact that way."""
    if attempt.fallback == "never" and (attempt.failure or attempt.running_failure):
        return Decision(RAISE, why)
    if not attempt.traced or attempt.hazards or "" in attempt.eager_calls:
        return _whole(why)
    leaves = {**attempt.eager_leaves(), **attempt.failed}
    return Decision(SYMBOLIC, f"{why}; eager leaves: {_listed(leaves)}", leaves)


def decide(attempt: Attempt) -> Decision:
    """The tracer for a model that gave ``attempt`` (the rules in the module docstring)."""
    if attempt.fallback == "always":
        return _whole("fallback='always'")
    if attempt.global_hooks:
        return _whole("global module hooks (register_module_forward_hook) run on every module")
    leaves = attempt.eager_leaves()
    problems = attempt.problems()
    if attempt.traced and not problems:
        reason = "torch.fx traces it exactly"
        return Decision(SYMBOLIC, reason + (f"; eager leaves: {_listed(leaves)}" if leaves else ""), leaves)
    eager = _listed(leaves) or ("the model itself (hooks)" if attempt.root_hooks else "")
    if eager or attempt.eager_calls:  # the root's custom function: among the problems
        kept = f"; {eager} must run as the model runs it, which torch.export cannot keep" if eager else ""
        return _fx_with_eager_leaves(attempt, "; ".join(problems) + kept)
    if not attempt.has_example:
        return Decision(LATER, "; ".join(problems))
    if attempt.running_failure is None:
        return Decision(RUNNING, "; ".join(problems))
    return _fx_with_eager_leaves(attempt, "; ".join(problems + [f"torch.export: {attempt.running_failure}"]))
