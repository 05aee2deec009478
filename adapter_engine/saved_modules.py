"""PEFT's ``modules_to_save``: trained copies of whole modules (a classification head) that an adapter carries.

PEFT wraps each such module in a ``ModulesToSaveWrapper`` holding one copy per adapter; the forward runs the active
adapter's copy (the original when no adapter with a copy there is active, or adapters are disabled), two active
adapters with copies of one module are refused, and ``adapter_names=`` mixed batches run each row group through its
adapter's copy. The copies are saved as the module's own keys (``base_model.model.classifier.weight``).

:class:`ModulesToSaveLayer` does the same per instance: it takes the original module's children, Parameters and
buffers under their own names (so the model's ``state_dict`` keys stay), keeps the copies in ``modules_to_save``
(PEFT's name) and follows the active adapters or the :func:`~adapter_engine.routing.use_adapters` route.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .changes import adapters_changed
from .routing import StaticRoute, check_rows, current_route, routed_under_compile, run_eagerly
from .wrapping import StandIn, share_hooks, unshare_hooks


class ModulesToSaveLayer(StandIn):
    """A module with per-adapter trained copies: ``modules_to_save[name]`` runs instead of the original when adapter
    ``name`` is active (or routed). The original's weights are this wrapper's, shared, and so are its hooks
    (``wrapping.share_hooks``): a hook on ``classifier`` runs around whichever module runs, the original or a copy.
    A copy has no hooks of its own; the modules inside it share theirs with the original's (:meth:`add_copy`)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []

    def add_copy(self, name: str, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A trainable copy of the original module for adapter ``name`` (its current weights, or ``state``).

        Hooks: the copy runs inside this wrapper's call, which runs the original's hooks, so it has none of its own
        (a deep copy had copies of them: they ran twice, and their handles could not remove them). A module inside
        it shares the hooks of the original's module of the same name: a hook on ``classifier.dense`` runs
        whichever of the two runs, and its handle removes it from both."""
        module = copy.deepcopy(self._original)
        unshare_hooks(module)
        inner = dict(self._original.named_modules())
        for path, sub in module.named_modules():
            if path:
                share_hooks(sub, inner[path])
        if state is None:  # the module's tensors as they are now, which may not be the original's objects any more
            state = {k: v for k, v in self.state_dict().items() if not k.startswith("modules_to_save.")}
        with torch.no_grad():
            own = module.state_dict(keep_vars=True)
            for key, value in state.items():
                own[key].copy_(value)
        module.requires_grad_(True)
        module.train(self.training)
        self.modules_to_save[name] = module
        adapters_changed()
        return module

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        adapters_changed()

    def _pick(self, stack: Sequence[str]) -> str | None:
        """The adapter of ``stack`` whose copy runs here (None: the original); two are refused, as PEFT does."""
        names = [n for n in stack if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(conflict(names, self._name()))
        return names[0] if names else None

    def _name(self) -> str:
        return f"a {type(self._original).__name__} with copies {sorted(self.modules_to_save)}"

    def _run(self, name: str | None, *args, **kwargs):
        if name is None:  # the original class's forward on this wrapper: its children and training flag
            return type(self._original).forward(self, *args, **kwargs)
        return self.modules_to_save[name](*args, **kwargs)

    def forward(self, *args, **kwargs):
        if routed_under_compile():
            return run_eagerly(type(self).forward, self, *args, **kwargs)
        route = current_route()
        if route is None:
            return self._run(self._pick(self.active_adapters), *args, **kwargs)
        if route.uniform:
            return self._run(self._pick(route.stack), *args, **kwargs)
        if isinstance(route, StaticRoute):  # a captured graph cannot regroup rows: its rows may not name a copy here
            route.refuse(list(self.modules_to_save), "a trained module copy (modules_to_save) is not in a static route")
            return self._run(None, *args, **kwargs)
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"a per-row route reached {self._name()} whose first argument is not a batch tensor")
        check_rows(route, x.shape[0], "a module with trained copies (modules_to_save)")
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(route.rows):
            groups.setdefault(self._pick(row), []).append(i)
        if len(groups) == 1:
            return self._run(next(iter(groups)), *args, **kwargs)
        out = None
        for name, rows in groups.items():  # PEFT's mixed batch: each row group through its own copy
            index = torch.tensor(rows, device=x.device)
            part = self._run(name, x[index], *args[1:], **kwargs)
            if not isinstance(part, torch.Tensor):
                raise ValueError(f"{self._name()} returns a {type(part).__name__}: a per-row route needs a tensor")
            out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
            out[index] = part
        return out


def conflict(names: Sequence[str], where: str) -> str:
    return (
        f"adapters {list(names)} both hold a trained copy of {where} (modules_to_save): only one copy can run, so "
        "they cannot be active (or routed to one row) together; PEFT refuses this too"
    )


def select(names: Iterable[str], entries: Iterable[str]) -> list[str]:
    """The module ``names`` (a model's, in ``named_modules`` order) that PEFT's ``modules_to_save`` entries select: a
    name ending with an entry (PEFT's rule: a plain ``str.endswith``); the outer one where a selected module holds
    another."""
    entries = list(entries)
    selected: list[str] = []
    for name in names:
        inside = any(name.startswith(s + ".") for s in selected)
        if name and not inside and any(name.endswith(e) for e in entries):
            selected.append(name)
    return selected
