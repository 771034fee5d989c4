"""The static screen run before a hook function is traced: a function that changes Python
state — rebinds a global or an outer variable, calls a mutating method on an outer object,
stores into one (``hook.ctx`` included) — is never traced, so the change does not happen once
while tracing and again at every firing; it runs as a callback instead.

The screen reads the function's bytecode (and that of functions nested in it), following which
object each load names where that can be told before running: globals, closure cells,
arguments bound by ``partial`` or defaults, the function's own locals.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Methods that change Python state; a function calling them on an outer object is not traced.
_STATE_METHODS = frozenset(
    {"append", "extend", "insert", "update", "setdefault", "add", "pop", "remove", "clear"}
)


class Untraceable(Exception):
    """Why a function cannot run as a graph: a stable ``reason`` code and a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__func__", fn)


def prescreen(fn: Callable[..., Any]) -> None:
    """Refuse, before running it, a function that changes Python state: rebinding a global
    or an outer variable, calling a mutating method (append, update, …) on an outer object, or
    storing into one (``counts[name] = …``, ``probe.last = …``, ``hook.ctx[k] = …``). Names are
    resolved where that is possible before running: globals, closure cells, arguments bound by
    ``partial`` or defaults; ``torch.add(x, 1)`` and ``x.add(1)`` call tensors and modules, and
    the hook function's own locals are its own."""
    scope = _Scope.of(fn)
    if scope is not None:
        scope.screen(scope.code, nested=False)


_LOCAL = object()  # a name local to the hook function (its own list, dict, tensor)
_UNKNOWN = object()  # a name that cannot be resolved before running
_ACTIVATION = object()  # the activation argument
_LOADS = frozenset(
    {
        "LOAD_FAST",
        "LOAD_FAST_CHECK",
        "LOAD_FAST_AND_CLEAR",
        "LOAD_DEREF",
        "LOAD_CLOSURE",
        "LOAD_CLASSDEREF",
        "LOAD_NAME",
    }
)
_PY312 = sys.version_info >= (3, 12)
# (popped, pushed) of the instructions that move values the screen follows; any other resets
# what it knows of the stack.
_EFFECTS: dict[str, Callable[[int], tuple[int, int]]] = {
    **dict.fromkeys(("NOP", "RESUME", "CACHE", "PRECALL", "KW_NAMES", "EXTENDED_ARG"),
                    lambda arg: (0, 0)),
    **dict.fromkeys(("BINARY_SUBSCR", "BINARY_OP", "COMPARE_OP", "IS_OP", "CONTAINS_OP"),
                    lambda arg: (2, 1)),
    **dict.fromkeys(("UNARY_NEGATIVE", "UNARY_NOT", "UNARY_INVERT", "GET_ITER"),
                    lambda arg: (1, 1)),
    **dict.fromkeys(("BUILD_SLICE", "BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_STRING"),
                    lambda arg: (arg, 1)),
    **dict.fromkeys(("STORE_FAST", "STORE_NAME", "POP_TOP", "RETURN_VALUE"), lambda arg: (1, 0)),
    "BUILD_MAP": lambda arg: (2 * arg, 1),
    "BINARY_SLICE": lambda arg: (3, 1),
    "CALL": lambda arg: (arg + 2, 1),
    "FORMAT_VALUE": lambda arg: (2 if arg & 4 else 1, 1),
    "PUSH_NULL": lambda arg: (0, 1),
    "LOAD_CONST": lambda arg: (0, 1),
}  # fmt: skip


@dataclass
class _Scope:
    """What the names of a hook function's code refer to, as far as known before it runs."""

    code: Any
    globals: dict[str, Any]
    cells: dict[str, Any]  # free variable -> its value (a closure cell's contents)
    params: dict[str, Any]  # parameter -> value, for those bound (partial, defaults, hook)

    @classmethod
    def of(cls, fn: Any) -> _Scope | None:
        inner = unwrap(fn)
        code = getattr(inner, "__code__", None)
        if code is None:
            return None
        cells: dict[str, Any] = {}
        closure = getattr(inner, "__closure__", None) or ()
        for name, cell in zip(code.co_freevars, closure, strict=False):
            try:
                cells[name] = cell.cell_contents
            except ValueError:  # an empty cell
                cells[name] = _UNKNOWN
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        positional = list(names[: code.co_argcount])
        defaults = inner.__defaults__ or ()
        with_defaults = positional[len(positional) - len(defaults) :]
        params: dict[str, Any] = dict(zip(with_defaults, defaults, strict=True))
        params.update(getattr(inner, "__kwdefaults__", None) or {})
        partials = []
        layer = fn
        while isinstance(layer, functools.partial):
            partials.append(layer)
            layer = layer.func
        bound: list[Any] = [layer.__self__] if hasattr(layer, "__self__") else []
        keywords: dict[str, Any] = {}
        for each in reversed(partials):  # the innermost partial's arguments come first
            bound.extend(each.args)
            keywords.update(each.keywords)
        params.update(zip(positional, bound, strict=False))
        params.update(keywords)
        free = [name for name in positional[len(bound) :] if name not in keywords]
        if free:
            params[free[0]] = _ACTIVATION  # the first argument left: the activation
        params.setdefault("hook", StandInHook(""))
        return cls(code, inner.__globals__, cells, params)

    def resolve(self, label: tuple[str, ...] | None, nested: bool) -> Any:
        if label is None:
            return _LOCAL  # an expression's value: a temporary
        kind, name, *attrs = label
        if kind == "global":
            value = self.globals.get(name, getattr(builtins, name, _UNKNOWN))
        elif kind == "deref" and name in self.cells:
            value = self.cells[name]
        elif name in self.params and (kind == "deref" or not nested):
            value = self.params[name]
        else:
            value = _LOCAL  # the function's own (or a nested function's own) variable
        for attr in attrs:
            if value in (_LOCAL, _UNKNOWN, _ACTIVATION):
                break
            try:
                value = inspect.getattr_static(value, attr)
            except AttributeError:
                value = _UNKNOWN
        return value

    def outside(self, label: tuple[str, ...] | None, nested: bool) -> bool:
        """Whether changing the object ``label`` names changes state outside the function."""
        value = self.resolve(label, nested)
        if value is _LOCAL or value is _ACTIVATION:
            return False
        if isinstance(value, torch.Tensor | types.ModuleType):
            return False  # tensors' writes are traced; torch.add is a function
        return not (isinstance(value, type) and issubclass(value, torch.Tensor))

    def screen(self, code: Any, nested: bool) -> None:
        stack: list[tuple[str, ...] | None] = []

        def pop() -> tuple[str, ...] | None:
            return stack.pop() if stack else None

        def state(label: tuple[str, ...] | None, what: str) -> None:
            if self.outside(label, nested):
                target = ".".join(label[1:]) if label else "an object"
                raise Untraceable("python-state", f"it {what} {target}, which is Python state")

        for ins in dis.get_instructions(code):
            op, arg = ins.opname, ins.arg or 0
            if ins.is_jump_target:
                stack = []
            if op in ("STORE_GLOBAL", "DELETE_GLOBAL") or (
                op in ("STORE_DEREF", "DELETE_DEREF") and ins.argval in self.cells
            ):
                raise Untraceable(
                    "python-state", f"it assigns to the outer variable {ins.argval!r}"
                )
            if hasattr(ins.argval, "co_code"):  # a nested function, lambda or comprehension
                self.screen(ins.argval, nested=True)
            if op == "LOAD_GLOBAL":
                stack += [None, ("global", ins.argval)] if arg & 1 else [("global", ins.argval)]
            elif op in _LOADS:
                kind = "deref" if "DEREF" in op or "CLOSURE" in op else "fast"
                stack.append((kind, ins.argval))
            elif op == "LOAD_FAST_LOAD_FAST":
                stack += [("fast", name) for name in ins.argval]
            elif op in ("LOAD_ATTR", "LOAD_METHOD"):
                owner = pop()
                if ins.argval in _STATE_METHODS:
                    state(owner, f"calls .{ins.argval}() on")
                method = op == "LOAD_METHOD" or (_PY312 and arg & 1)
                stack += [None, None] if method else [(*owner, ins.argval) if owner else None]
            elif op in ("STORE_SUBSCR", "DELETE_SUBSCR"):
                pop()
                state(pop(), "stores into" if op == "STORE_SUBSCR" else "deletes from")
                if op == "STORE_SUBSCR":
                    pop()
            elif op in ("STORE_ATTR", "DELETE_ATTR"):
                state(pop(), f"sets .{ins.argval} of")
                if op == "STORE_ATTR":
                    pop()
            elif op == "COPY":
                stack.append(stack[-arg] if len(stack) >= arg else None)
            elif op == "SWAP" and len(stack) >= arg:
                stack[-1], stack[-arg] = stack[-arg], stack[-1]
            elif op in _EFFECTS:
                popped, pushed = _EFFECTS[op](arg)
                for _ in range(popped):
                    pop()
                stack += [None] * pushed
            else:  # not followed: what is on the stack is no longer known
                try:
                    effect = dis.stack_effect(ins.opcode, ins.arg, jump=False)
                except ValueError:
                    effect = -len(stack)
                stack = [None] * max(0, len(stack) + effect)


@dataclass
class StandInHook:
    """What the traced function receives as ``hook``: TransformerLens's HookPoint surface."""

    name: str
    ctx: dict[str, Any] = field(default_factory=dict)

    def layer(self) -> int:
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks":
            raise ValueError(f"hook point {self.name!r} is not inside a block")
        return int(parts[1])
