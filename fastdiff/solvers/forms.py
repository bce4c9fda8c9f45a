"""Linear forms standing in for image tensors while a reference solver is traced (trace.py).

A `Form` holds, per representation of the trace ("D" and "E", trace.py), a sparse
{register: coefficient} dict, and answers the solver's operations on an image: sums, scalar
multiples, copies, casts and views are exact operations on the dicts; shape / dtype / device
queries are answered by a stand-in tensor of an odd shape (SHAPE); anything else -- a product of
two states, a constant offset, abs, comparisons -- raises Untraceable naming the operation.
Python operators reach the methods directly, torch functions and Tensor methods through
__torch_function__ (the tensor-like protocol), in float64 whatever the solver asks for.

Forms are never modified in place (an in-place op rebinds the form's dicts), so unscaled
copies share their dicts. A form records the tracer's elimination epoch it is reduced to and is
brought up to date (`_fresh`) when next read.
"""

from __future__ import annotations

import numbers

import torch

_F64 = torch.float64
SHAPE = (1, 37)  # what a form looks like to the solver: odd, so a stray real tensor stands out
_BASE = torch.zeros(SHAPE, dtype=_F64)


class Untraceable(TypeError):
    """The reference did something to the traced state that is not linear."""


def _scalar(v):
    """v as a float if it is a number or a one-element plain tensor, else None."""
    tv = type(v)
    if tv is float or tv is int:
        return float(v)
    if tv is torch.Tensor:  # the reference's 0-d coefficients: the common case first
        return float(v) if v.numel() == 1 else None
    if isinstance(v, Form):
        return None
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 else None
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def _combine(a: dict, ca: float, b: dict, cb: float) -> dict:
    """ca * a + cb * b, a term that cancels to exactly 0 dropped; keys in a's order, then b's
    new ones. The hottest loop of a trace, so written for the interpreter: plain loops (a dict
    comprehension costs a function call), `in` and subscripts rather than dict.get. A key new
    to a gets cb * v itself, which is 0.0 + cb * v exactly."""
    if ca == 1.0:
        out = a.copy()
    else:
        out = {}
        for k, v in a.items():
            out[k] = ca * v
    for k, v in b.items():
        c = out[k] + cb * v if k in out else cb * v
        if c == 0.0:
            out.pop(k, None)
        else:
            out[k] = c
    return out


class Form:
    """A linear form over the trace's registers, standing in for an image tensor: `t` holds
    {register: coefficient} per representation. Only linear operations are defined; anything
    else raises Untraceable naming the operation.

    A tensor-like object, not a torch.Tensor subclass: torch functions reach it through
    __torch_function__ all the same, and creating one costs a fifth of a tensor subclass (a
    plan traces ~7 forms per model call). Only x_T, which the reference validates as a
    tensor, is one (`_TensorForm`)."""

    __slots__ = ()
    # what the reference reads off an image: the stand-in tensor's answers
    shape, ndim, dtype, device = _BASE.shape, _BASE.ndim, _BASE.dtype, _BASE.device

    # -- arithmetic (Python operators reach these directly; torch calls via __torch_function__)

    def __add__(self, other):
        return _lin(self, other, 1.0, "add")

    def __radd__(self, other):
        return _lin(self, other, 1.0, "add")

    def __sub__(self, other):
        return _lin(self, other, -1.0, "subtract")

    def __rsub__(self, other):
        return _scaled(_lin(self, other, -1.0, "subtract"), -1.0)

    def __mul__(self, other):
        c = other if type(other) is float else _scalar(other)  # the common case inline
        if c is None:
            raise Untraceable(f"multiplying the traced state by {_what(other)}: not linear")
        tracer, epoch = self.tracer, self.epoch
        if c == 0.0 or self.c != 1.0 or epoch != tracer.epoch:
            return _scaled(self, c)
        f = _new_form(_Form)  # _scaled inline: a current, expanded form times c
        f.t = self.t
        f.tracer = tracer
        f.epoch = epoch
        f.c = c
        return f

    __rmul__ = __mul__

    def __truediv__(self, other):
        c = _scalar(other)
        if c is None:
            raise Untraceable(f"dividing the traced state by {_what(other)}: not linear")
        return _scaled(self, 1.0 / c)

    def __neg__(self):
        return _scaled(self, -1.0)

    def __pos__(self):
        return _scaled(self, 1.0)

    def __iadd__(self, other):
        return self._assign(_lin(self, other, 1.0, "add"))

    def __isub__(self, other):
        return self._assign(_lin(self, other, -1.0, "subtract"))

    def __imul__(self, other):
        return self._assign(self * other)

    def __itruediv__(self, other):
        return self._assign(self / other)

    def _assign(self, value: Form) -> Form:
        self.t, self.epoch, self.c = value.t, value.epoch, value.c
        return self

    def __repr__(self):
        return f"Form({ {k: self.c * v for k, v in self.t[0].items()} })"

    def __hash__(self):
        return id(self)

    def __getattr__(self, name):
        """Tensor methods and properties not defined here: through __torch_function__, as
        they reach a tensor subclass."""
        attr = getattr(torch.Tensor, name)
        if not callable(attr):  # a property: answered by the stand-in tensor
            return getattr(_BASE, name)

        def method(*args, **kwargs):
            return Form.__torch_function__(attr, (type(self),), (self, *args), kwargs)
        return method

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(*args, **kwargs)
        if name in _QUERIES:  # shape, dtype, ndim, ...: answered by the stand-in tensor
            with torch._C.DisableTorchFunctionSubclass():
                return func(*[_BASE if isinstance(a, Form) else a for a in args], **kwargs)
        raise Untraceable(f"the plan tracer cannot apply {name or func} to the traced state "
                          "(only linear operations are traceable)")


class _Form(Form):
    __slots__ = ("t", "tracer", "epoch", "c")


class _TensorForm(Form, torch.Tensor):
    """x_T: a form that is a torch.Tensor, as the reference's validate_x asks."""

    __slots__ = ("t", "tracer", "epoch", "c")


def _as_tensor_would(name: str):
    """Operator `name` as a tensor subclass gets it: through __torch_function__ (so mostly
    Untraceable, naming the operation, rather than Python's default or a TypeError)."""
    fn = getattr(torch.Tensor, name)

    def op(self, *args):
        return Form.__torch_function__(fn, (type(self),), (self, *args))
    return op


for _name in ("__abs__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__floordiv__",
              "__rfloordiv__", "__mod__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__",
              "__ne__", "__bool__", "__float__", "__int__", "__index__", "__len__", "__and__",
              "__or__", "__xor__", "__invert__", "__format__", "__iter__"):
    setattr(Form, _name, _as_tensor_would(_name))


def _what(v) -> str:
    if isinstance(v, Form):
        return "the traced state"
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} (not a traced form: a direct torch.randn?)"
    return type(v).__name__


_new_form = object.__new__


def _form(tracer, terms: list, epoch: int, c: float = 1.0) -> Form:
    f = _new_form(_Form)
    f.t = terms  # one store a slot: a tuple assignment would build and unpack a tuple
    f.tracer = tracer
    f.epoch = epoch
    f.c = c
    return f


def _tensor_form(tracer, terms: list, epoch: int) -> Form:
    f = torch.Tensor._make_subclass(_TensorForm, _BASE)
    f.t, f.tracer, f.epoch, f.c = terms, tracer, epoch, 1.0
    return f


# A scalar multiple c * a is held unexpanded (f.c = c over a's dicts) until it is read: a sum
# reading it (`_lin`, the common case: x' = c1 x - c2 D) multiplies while it combines, so the
# scaled dicts are never built on their own. The values are those of expanding at once: each
# coefficient is c * v either way, and the sum's -1 * (c * v) = (-c) * v exactly.

def _times(c: float, terms: dict) -> dict:
    out = {}
    for k, v in terms.items():  # a plain loop: a dict comprehension costs a function call
        out[k] = c * v
    return out


def _expand(f: Form) -> None:
    c, (t0, t1) = f.c, f.t
    f.t = [_times(c, t0) if t0 else {}, _times(c, t1) if t1 else {}]  # {}: a representation
    f.c = 1.0  # no longer traced


def _fresh(f: Form) -> list:
    """f's dicts, expanded and reduced to the tracer's epoch."""
    if f.c != 1.0:
        _expand(f)
    if f.epoch != f.tracer.epoch:
        f.tracer.reduce(f)
    return f.t


def _lin(a: Form, b, cb: float, verb: str) -> Form:
    """a + cb * b (cb = +-1)."""
    if isinstance(b, Form):
        tracer = a.tracer
        epoch = tracer.epoch
        if a.epoch != epoch:
            _fresh(a)
        if b.epoch != epoch:
            _fresh(b)
        (a0, a1), (b0, b1) = a.t, b.t
        ca, cb = a.c, cb * b.c
        f = _new_form(_Form)  # _form inline
        f.t = [_combine(a0, ca, b0, cb) if a0 or b0 else {},
               _combine(a1, ca, b1, cb) if a1 or b1 else {}]
        f.tracer = tracer
        f.epoch = epoch
        f.c = 1.0
        return f
    if _scalar(b) == 0.0:  # sum() starts from 0
        return _scaled(a, 1.0)
    raise Untraceable(f"cannot {verb} {_what(b)} and the traced state: a constant offset is"
                      " not linear in the state")


def _scaled(a: Form, c: float) -> Form:
    t = _fresh(a)
    tracer = a.tracer
    f = _new_form(_Form)  # _form inline
    f.tracer = tracer
    f.epoch = tracer.epoch
    if c == 0.0:
        f.t, f.c = [{}, {}], 1.0
    else:  # c = 1: a copy (forms' dicts are never modified in place, so they can be shared)
        f.t, f.c = [t[0], t[1]], c
    return f


def _binary(sign: float, verb: str):
    def op(a, b, *, alpha=1, out=None):
        if out is not None:
            raise Untraceable(f"{verb} with out=: not traceable")
        if not isinstance(a, Form):  # scalar + form
            return _scaled(_lin(b, a, sign, verb), sign)
        return _lin(a, b * alpha if isinstance(b, Form) else b, sign, verb)
    return op


def _mul(a, b, *, out=None):
    return a * b if isinstance(a, Form) else b * a


def _div(a, b, *, rounding_mode=None, out=None):
    if rounding_mode is not None or not isinstance(a, Form):
        raise Untraceable("dividing by the traced state (or rounding it): not linear")
    return a / b


def _inplace(op):
    def run(a, *args, **kwargs):
        return a._assign(op(a, *args, **kwargs))
    return run


def _same(a, *args, **kwargs):
    """Copies, dtype/device moves and views that keep the image's meaning."""
    return _scaled(a, 1.0)


def _getitem(a, index):
    parts = index if isinstance(index, tuple) else (index,)
    if all(p is Ellipsis or p is None or p == slice(None) for p in parts):
        return _scaled(a, 1.0)
    raise Untraceable(f"indexing the traced state with {index!r}: only [...]/None keep it whole")


def _lerp(a, b, weight, *, out=None):
    w = _scalar(weight)
    if w is None or not isinstance(a, Form) or not isinstance(b, Form):
        raise Untraceable("lerp needs two traced forms and a scalar weight")
    return a + w * (b - a)


def _zeros_like(a, *args, **kwargs):
    return _scaled(a, 0.0)


def _randn_like(a, *args, **kwargs):
    return a.tracer.draw(())


def _new(name):
    def make(a, *args, **kwargs):
        shape = args[0] if args else kwargs.get("size")
        if name in ("new_zeros", "new_empty") and shape is not None and \
                tuple(shape) == tuple(SHAPE):
            return _scaled(a, 0.0)  # a zero image
        with torch._C.DisableTorchFunctionSubclass():
            result = getattr(_BASE, name)(*args, **kwargs)
        if tuple(result.shape) == tuple(SHAPE):
            raise Untraceable(f"{name} of an image-shaped constant: not linear in the state")
        return result
    return make


_HANDLERS = {
    "add": _binary(1.0, "add"), "__add__": _binary(1.0, "add"),
    "__radd__": _binary(1.0, "add"), "sub": _binary(-1.0, "subtract"),
    "subtract": _binary(-1.0, "subtract"), "__sub__": _binary(-1.0, "subtract"),
    "__rsub__": lambda a, b: Form.__rsub__(a, b),
    "mul": _mul, "multiply": _mul, "__mul__": _mul, "__rmul__": _mul,
    "div": _div, "divide": _div, "true_divide": _div, "__truediv__": _div,
    "neg": lambda a: -a, "negative": lambda a: -a, "__neg__": lambda a: -a,
    "lerp": _lerp, "zeros_like": _zeros_like, "empty_like": _zeros_like,
    "randn_like": _randn_like,
    # Copies, moves and casts keep the form exact (the trace is float64 whatever the solver asks)
    "clone": _same, "detach": _same, "contiguous": _same, "to": _same, "double": _same,
    "float": _same, "half": _same, "bfloat16": _same, "type": _same, "cpu": _same,
    "cuda": _same, "type_as": _same, "view_as": _same, "expand_as": _same,
    "__getitem__": _getitem,
}
_HANDLERS.update({name + "_": _inplace(_HANDLERS[name]) for name in ("add", "sub", "mul", "div",
                                                                        "neg", "lerp")})
_HANDLERS["zero_"] = _inplace(_zeros_like)
_HANDLERS["copy_"] = lambda a, b, non_blocking=False: a._assign(_scaled(b, 1.0))
for _name in ("new_ones", "new_zeros", "new_tensor", "new_empty", "new_full"):
    _HANDLERS[_name] = _new(_name)
_QUERIES = {"__get__", "dim", "size", "numel", "is_floating_point", "is_complex", "__len__",
            "element_size", "get_device", "is_contiguous", "__format__", "ndimension", "nelement"}
