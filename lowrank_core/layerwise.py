"""Run a decoder (any entry of the arch table) one layer at a time (sequential compression, the 7B path).

``capture_layer_inputs`` records, for each calibration batch, the hidden states entering decoder layer 0
and the keyword arguments the decoder passes to every layer (causal mask — per layer, since Qwen2 may
mix sliding and full attention —, rotary ``position_embeddings``, ``position_ids``). It runs the
embedding and mask code only: the decoder layers are swapped for recorders in a shallow copy of the base
model, so no layer computes and the teacher is not touched.

``run_layer`` then applies one layer to stored hidden states, batch by batch. Layer weights may live on
another device (e.g. a 7B model on CPU): the layer is copied to the compute device for the call and
the outputs are stored where ``store_device`` says (CPU keeps GPU memory to one layer plus a batch).

Teachers dispatched by accelerate (``device_map=...``, ``dispatch_model``, ``cpu_offload``) carry
``AlignDevicesHook``\ s; offloaded modules hold ``meta`` parameters whose values live in the hook's
``weights_map``. ``module_device`` is then the hook's execution device, and ``layer_on`` /
:func:`unhooked` give a hook-free copy of a layer on the compute device: tensors already there are
shared, offloaded ones are read from the weights map, the teacher and its hooks are left as they are.

``walk_layers`` is **the one layer-by-layer loop** (llm-compressor's sequential pipeline with a callback
per layer): the decoder inputs of one or more named streams captured once, then for each decoder layer in
turn a plain view of it on the compute device (``layer_on`` + ``private_view``), a :class:`LayerStep`
handed to the callback (which may collect statistics — :meth:`LayerStep.grams`, the one per-layer Gram
pass —, run the layer with replacement modules on a stream — a student —, or return any stream's
outputs), and every stream the callback did not return advanced by the teacher layer. Compression's
sequential path, its hidden-MSE pass and the search profile are its three callbacks.

Shapes: hidden states ``[B, T, hidden]`` in the model dtype; masks ``[B, T]`` bool, True at real
(non-padding) tokens — every statistic here excludes padding through them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .arch import arch_of
from .calibrate import GramAccumulator, GramStats, product_dtype
from .experts import RoutedMasks
from .progress import Progress, ensure_progress
from .student import build_student, private_view

_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


@dataclass
class LayerInputs:
    """What one decoder layer needs, for a list of batches.

    hidden: per batch ``[B, T, hidden]`` — the stream entering the current layer (replaced as layers run).
    masks: per batch ``[B, T]`` bool, True at real tokens.
    layer_kwargs: per batch, one kwargs dict per decoder layer (equal layers share one dict object).
    """

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor]
    layer_kwargs: list[list[dict]]

    @property
    def tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def with_hidden(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        """The same masks and kwargs with another hidden-state stream (e.g. the student's)."""
        return LayerInputs(hidden, self.masks, self.layer_kwargs)


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its kwargs and passes the hidden states through."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}))
        return hidden_states


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return arch_of(model).decoder_layers(model)


def _hooks_of(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` itself (a ``SequentialHook`` unrolled)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _hook_device(module: nn.Module) -> Optional[torch.device]:
    for hook in _hooks_of(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def is_dispatched(module: nn.Module) -> bool:
    """Whether accelerate hooks sit on ``module`` or any submodule, or a tensor of it is offloaded (meta)."""
    return any("_hf_hook" in m.__dict__ for m in module.modules()) or any(
        t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers()))


def _own_device(module: nn.Module) -> Optional[torch.device]:
    own = _hook_device(module)
    if own is not None:
        return own
    for name, p in module.named_parameters():
        if p.device.type != "meta":
            return p.device
        parts = name.split(".")[:-1]
        for cut in range(len(parts), -1, -1):
            device = _hook_device(module.get_submodule(".".join(parts[:cut])) if cut else module)
            if device is not None:
                return device
        return None
    return None


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of its own accelerate hook when it has one, else
    the device of its first parameter — for an offloaded (``meta``) parameter, the execution device of the
    nearest hooked module holding it —, else CPU. Equals the first parameter's device for a plain module."""
    return _own_device(module) or torch.device("cpu")


def _device_in(root: nn.Module, name: str) -> torch.device:
    """:func:`module_device` of ``root.get_submodule(name)``, looking up the hooks of its ancestors too
    (an offloaded linear inside a hooked decoder layer computes where that layer's hook says)."""
    module = root.get_submodule(name) if name else root
    own = _own_device(module)
    if own is not None:
        return own
    parts = name.split(".") if name else []
    for cut in range(len(parts) - 1, -1, -1):
        device = _hook_device(root.get_submodule(".".join(parts[:cut])) if cut else root)
        if device is not None:
            return device
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters); for a model
    dispatched by accelerate, where its inputs go (:func:`module_device`: the top hook's execution device)."""
    return module_device(model)


def _offloaded_value(root: nn.Module, name: str) -> torch.Tensor:
    """The value of the offloaded (meta) tensor ``name`` of ``root``: from the weights map of the deepest
    hooked module on its path that holds it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = root.get_submodule(".".join(parts[:cut])) if cut else root
        for hook in _hooks_of(owner):
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[".".join(parts[cut:])]
            except KeyError:
                continue
    raise ValueError(f"{name} is on the meta device and no accelerate hook on its path holds its value")


def unhooked(root: nn.Module, name: str = "", device=None) -> nn.Module:
    """A hook-free copy of ``root.get_submodule(name)`` (``root`` itself for ``""``) with every tensor on
    ``device`` (default: :func:`module_device` of it).

    Module objects are copied; tensors already on ``device`` are the very tensors of ``root`` (no weight
    memory), others are copied there, offloaded (``meta``) ones read from the accelerate hooks' weights
    maps (on the module or on an ancestor, hence ``root`` and ``name``). The hooks are never copied (their
    weights maps may hold gigabytes), ``root``, its hooks and its tensors are not modified, tied tensors
    stay tied."""
    module = root.get_submodule(name) if name else root
    device = torch.device(device) if device is not None else _device_in(root, name)
    memo: dict[int, object] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        memo[id(t)] = t
    for m in module.modules():
        if "_hf_hook" in m.__dict__:
            memo[id(m.__dict__["_hf_hook"])] = None
    out = copy.deepcopy(module, memo)
    for m in out.modules():  # accelerate's remove_hook_from_module, on the copy only
        if "_hf_hook" in m.__dict__:
            del m.__dict__["_hf_hook"]
            if "_old_forward" in m.__dict__:
                m.forward = m.__dict__.pop("_old_forward")
    moved: dict[int, torch.Tensor] = {}
    prefix = f"{name}." if name else ""
    for path, m in out.named_modules():
        for store, is_param in ((m._parameters, True), (m._buffers, False)):
            for key, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in moved:
                    if t.device.type == "meta":
                        full = f"{prefix}{path}.{key}" if path else f"{prefix}{key}"
                        value = _offloaded_value(root, full).to(device=device, dtype=t.dtype)
                    elif t.device != device:
                        value = t.detach().to(device)
                    else:
                        value = t
                    if value is not t and is_param:
                        value = nn.Parameter(value, requires_grad=t.requires_grad)
                    moved[id(t)] = value
                store[key] = moved[id(t)]
    return out


def to_device(obj, device):
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _shared_kwargs(kwargs_per_layer: list[dict], device) -> list[dict]:
    """Move each layer's kwargs to ``device``; layers given the same objects share one moved dict."""
    out, seen = [], {}
    for kw in kwargs_per_layer:
        key = tuple((k, id(v)) for k, v in sorted(kw.items()))
        if key not in seen:
            seen[key] = to_device(kw, device)
        out.append(seen[key])
    return out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable[dict], store_device=None,
                         progress: Optional[Progress] = None, total: Optional[int] = None) -> LayerInputs:
    """Hidden states entering layer 0 and every layer's kwargs, for each batch (no layer is run).

    ``batches``: dicts with ``input_ids`` and ``attention_mask`` ``[B, T]``. ``store_device``: where the
    hidden states are kept (default: the model's device; ``"cpu"`` for big models on a GPU).
    """
    progress = ensure_progress(progress)
    spec = arch_of(model)
    base, layers = spec.decoder_of(model), spec.decoder_layers(model)
    attr = spec.layers[len(spec.decoder) + 1:]  # the layer list's attribute in the decoder, e.g. "layers"
    device = model_device(model)
    store = torch.device(store_device) if store_device is not None else device
    sink: list = []
    shell = copy.copy(base)  # shallow: shares every parameter, the teacher is left as it is
    if "_hf_hook" in shell.__dict__:  # a hooked decoder: the shell runs its own forward (with the recorders)
        shell.__dict__ = {k: v for k, v in shell.__dict__.items() if k not in ("_hf_hook", "_old_forward", "forward")}
        device = module_device(base)
    shell._modules = dict(base._modules)
    shell._modules[attr] = nn.ModuleList([_Recorder(sink) for _ in layers])
    hidden, masks, kwargs = [], [], []
    batches = list(batches) if total is None else batches
    total = len(batches) if total is None else total
    for b, batch in enumerate(batches):
        sink.clear()
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
        shell(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        if len(sink) != len(layers):
            raise RuntimeError(f"decoder called {len(sink)} of {len(layers)} layers; unsupported model")
        hidden.append(sink[0][0].to(store))
        masks.append(mask.bool().to(store))
        kwargs.append(_shared_kwargs([kw for _, kw in sink], store))
        progress(b + 1, total, "embedding calibration batches")
    return LayerInputs(hidden, masks, kwargs)


def layer_on(layer: nn.Module, device) -> nn.Module:
    """``layer`` itself if its weights are on ``device``, else a copy there (the original is untouched).
    A layer dispatched by accelerate (hooks, offloaded ``meta`` weights) always gives a hook-free copy
    on ``device`` (:func:`unhooked`: the tensors already there are shared)."""
    device = torch.device(device)
    if is_dispatched(layer):
        if device.type == "cuda" and device.index is None:
            here = module_device(layer)
            device = here if here.type == "cuda" else device
        return unhooked(layer, "", device)
    p = next(layer.parameters())
    if p.device == device or (device.type == p.device.type == "cuda" and device.index is None):
        return layer
    return copy.deepcopy(layer).to(device)


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on ``hidden`` ``[B, T, H]`` (tuple outputs of older transformers unwrapped)."""
    out = layer(hidden, use_cache=False, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, index: int, device=None, store_device=None,
              hidden: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """Outputs of decoder layer ``index`` (module ``layer``) for every batch, ``[B, T, H]`` each.

    ``hidden`` overrides ``inputs.hidden`` (e.g. the student's stream). Computation on ``device``
    (default: the layer's, :func:`module_device`), results stored on ``store_device`` (default: where the
    inputs are).
    """
    hidden = inputs.hidden if hidden is None else hidden
    device = torch.device(device) if device is not None else module_device(layer)
    layer = layer_on(layer, device)
    outs = []
    for h, kw in zip(hidden, inputs.layer_kwargs):
        store = torch.device(store_device) if store_device is not None else h.device
        outs.append(call_layer(layer, h.to(device), to_device(kw[index], device)).to(store))
    return outs


def final_norm(model: nn.Module) -> nn.Module:
    return arch_of(model).final_norm(model)


# ----------------------------------------------------------------------------- leading layers shared
def _tensors(module: nn.Module) -> dict:
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return dict(named)


def shared_layers(teacher: nn.Module, student: nn.Module) -> Optional[int]:
    """How many leading decoder layers ``student`` shares unchanged with ``teacher`` (every tensor the very
    same object, as :func:`~lowrank_core.student.build_student` leaves them), or None when even the
    embeddings differ (or the models are of other architectures, not plain-head, or dispatched): then
    nothing can be computed once for both."""
    spec, other = arch_of(teacher, strict=False), arch_of(student, strict=False)
    if spec is None or other is None or spec.model_type != other.model_type or not spec.plain_head:
        return None
    if type(teacher) is not type(student) or is_dispatched(teacher) or is_dispatched(student):
        return None
    t_layers, s_layers = spec.decoder_layers(teacher), spec.decoder_layers(student)
    outside = {id(m) for m in s_layers} | {id(spec.final_norm(student))}
    t_dec, s_dec = _tensors(spec.decoder_of(teacher)), spec.decoder_of(student)
    for path, module in s_dec.named_modules():
        if _inside(path, s_dec, outside):
            continue
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t_dec.get(f"{path}.{name}" if path else name) is not t:
                return None
    count = 0
    for t_layer, s_layer in zip(t_layers, s_layers):
        mine, theirs = _tensors(s_layer), _tensors(t_layer)
        if mine.keys() != theirs.keys() or any(mine[k] is not theirs[k] for k in mine):
            break
        count += 1
    return count


def _inside(path: str, root: nn.Module, outside: set) -> bool:
    """Whether module ``path`` of ``root`` lies under one of the modules ``outside`` (by id)."""
    parts = path.split(".") if path else []
    for cut in range(len(parts), 0, -1):
        if id(root.get_submodule(".".join(parts[:cut]))) in outside:
            return True
    return False


@torch.no_grad()
def decoder_inputs(model: nn.Module, batch: dict) -> LayerInputs:
    """One batch's layer-0 states and per-layer kwargs (:func:`capture_layer_inputs`), with the position ids
    :func:`~lowrank_core.evaluate.logits_at` uses (counted from each row's first real token)."""
    mask = batch["attention_mask"]
    return capture_layer_inputs(model, [{"input_ids": batch["input_ids"], "attention_mask": mask,
                                         "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}])


@torch.no_grad()
def run_layers(model: nn.Module, inputs: LayerInputs, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``hidden`` [B, T, H] through ``model``'s decoder layers ``start`` .. ``stop`` - 1 (batch 0's kwargs)."""
    layers = arch_of(model).decoder_layers(model)
    for i in range(start, stop):
        hidden = call_layer(layers[i], hidden, inputs.layer_kwargs[0][i])
    return hidden


def head_logits(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] at ``positions`` [B, T] (bool) from the last layer's states ``hidden`` [B, T, H]."""
    spec = arch_of(model)
    normed = spec.final_norm(model)(hidden)
    return spec.head_of(model)(normed[positions.to(normed.device)])


def masked_square_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int]:
    """(Σ (a−b)², Σ b², tokens) over positions where ``mask`` ``[B, T]`` is True; a, b ``[B, T, H]``."""
    m = mask.to(a.device)
    d = (a[m].double() - b.to(a.device)[m].double())
    ref = b.to(a.device)[m].double()
    return float((d * d).sum()), float((ref * ref).sum()), int(m.sum())


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], masks: list[torch.Tensor],
               width: int) -> dict:
    """Mean squared error per element between two hidden streams over real tokens, and relative to ‖teacher‖²."""
    err = ref = 0.0
    tokens = 0
    for s, t, m in zip(student, teacher, masks):
        e, r, n = masked_square_error(s, t, m)
        err, ref, tokens = err + e, ref + r, tokens + n
    return {"mse": err / max(1, tokens * width), "rel_mse": err / ref if ref > 0 else 0.0, "tokens": tokens}


# ----------------------------------------------------------------------------- the one layer-by-layer loop
@torch.no_grad()
def gram_pass(layer, inputs: LayerInputs, index: int, hidden: list, names: dict[str, str], fit_idx: list[int],
              device, keep_outputs: bool, outputs: Optional[dict[str, str]] = None,
              precision: str = "float32") -> tuple[Optional[list], dict, dict]:
    """Run decoder layer ``index`` on ``hidden`` with pre-hooks accumulating the input Grams of the linears
    ``names`` ({path in layer: gram_key}) and forward hooks accumulating the output covariances of
    ``outputs`` ({path in layer: output key}); batches in ``fit_idx`` feed the fit statistics, the others
    the held-out ones. Returns (outputs or None, fit statistics, held-out statistics), keyed by key.

    Sums through ``GramAccumulator``, as :func:`~lowrank_core.calibrate.collect_grams` sums its float32 /
    bfloat16 products (the same bits on the same tokens); fit statistics float64, held-out ones stored
    float32, all on ``device``. The hooks go on ``layer`` and are removed before returning: pass a private
    view (:class:`LayerStep` does)."""
    mods = dict(layer.named_modules())
    first: dict[str, tuple[str, bool]] = {}
    for rel, key in names.items():
        first.setdefault(key, (rel, False))
    for rel, key in (outputs or {}).items():
        first[key] = (rel, True)
    dim = {k: mods[r].out_features if after else mods[r].in_features for k, (r, after) in first.items()}
    fit = set(fit_idx)
    sides = ("fit", "held") if len(fit) < len(hidden) else ("fit",)   # no held-out batch: no held-out sums
    stats = {side: {k: GramStats.zeros(dim[k], device=device) for k in first} for side in sides}
    dtype = product_dtype(precision, device)
    sums = {side: {k: GramAccumulator(g, dtype) for k, g in part.items()} for side, part in stats.items()}
    state = {"mask": None, "side": "fit"}
    routed = RoutedMasks(layer, [rel for rel, _ in first.values()])  # an expert's rows: its routed tokens

    def hook_for(key):
        def hook(_mod, args, *output):
            sums[state["side"]][key].add(output[0] if output else args[0], routed.mask(first[key][0], state["mask"]))
        return hook

    handles = [mods[rel].register_forward_hook(hook_for(key)) if after else
               mods[rel].register_forward_pre_hook(hook_for(key)) for key, (rel, after) in first.items()]
    outs = []
    try:
        for b, (h, kw) in enumerate(zip(hidden, inputs.layer_kwargs)):
            state["mask"], state["side"] = inputs.masks[b].to(device), "fit" if b in fit else "held"
            y = call_layer(layer, h.to(device), to_device(kw[index], device))
            if keep_outputs:
                outs.append(y.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
        routed.remove()
    for part in sums.values():
        for acc in part.values():
            acc.flush()
    # held-out Grams only measure errors: float32 storage halves their memory (fit Grams stay float64)
    held = {k: GramStats(g.gram.float(), g.tokens) for k, g in stats.get("held", {}).items()}
    return (outs if keep_outputs else None), stats["fit"], held


@dataclass
class LayerStep:
    """Decoder layer ``index`` during :func:`walk_layers`, handed to the callback.

    ``layer``: the teacher's layer as the model holds it (never modified, no hook goes on it); ``work``: a
    plain view of it on ``device`` (hook-free; tensors already there shared, others copied there once —
    one layer's weights on the compute device); ``prefix``: the layer's module path with a trailing dot
    (``model.layers.3.``); ``inputs``: {stream: LayerInputs} (masks and per-layer kwargs); ``hidden``:
    {stream: per batch ``[B, T, H]``, the states entering this layer; a stream leaves it once
    :meth:`advance`\ d}. Streams holding the very same list (a student stream before its first replaced
    layer) share every teacher computation."""

    index: int
    layer: nn.Module
    work: nn.Module
    device: torch.device
    prefix: str
    inputs: dict[str, LayerInputs]
    hidden: dict[str, list]
    _outputs: dict = field(default_factory=dict, repr=False)   # id(hidden list) -> teacher outputs on it
    _next: dict = field(default_factory=dict, repr=False)      # stream -> states leaving the layer (None: done)

    def advance(self, stream: str, outputs: Optional[list]) -> None:
        """``outputs`` are ``stream``'s states leaving this layer (None: stop walking it). Its entering states
        are let go now (no longer in ``hidden``), not at the end of the step: e.g. the profile's calibration
        stream, advanced right after its Gram pass, is not held during the probes."""
        if stream not in self.hidden:
            raise ValueError(f"layer {self.index}: stream {stream!r} is not entering it (unknown, or already advanced)")
        old = self.hidden.pop(stream)
        self._next[stream] = outputs
        if not any(h is old for h in self.hidden.values()):
            self._outputs.pop(id(old), None)   # no stream reads that list any more: its id may be reused

    def same(self, a: str, b: str) -> bool:
        """Whether streams ``a`` and ``b`` are the same list (e.g. no layer of the student replaced yet)."""
        return self.hidden[a] is self.hidden[b]

    def output(self, stream: str) -> list:
        """The teacher layer's outputs on ``stream`` (stored where its inputs are), computed once per list."""
        key = id(self.hidden[stream])
        if key not in self._outputs:
            self._outputs[key] = run_layer(self.work, self.inputs[stream], self.index, hidden=self.hidden[stream],
                                           device=self.device)
        return self._outputs[key]

    def run(self, stream: str, replacements: Mapping[str, nn.Module]) -> list:
        """Outputs on ``stream`` of the layer with ``replacements`` ({path in the layer: module}, each
        moved to ``device`` when elsewhere; the teacher layer's own outputs when empty)."""
        if not replacements:
            return self.output(stream)
        student = build_student(self.work, {rel: layer_on(m, self.device) for rel, m in replacements.items()})
        return run_layer(student, self.inputs[stream], self.index, hidden=self.hidden[stream], device=self.device)

    def grams(self, stream: str, names: dict[str, str], fit_idx: list[int], keep_outputs: bool = False,
              outputs: Optional[dict[str, str]] = None, precision: str = "float32") -> tuple[dict, dict]:
        """(fit, held-out) statistics of this layer's linears on ``stream``: :func:`gram_pass` on ``work``.
        With ``keep_outputs`` the pass's outputs become :meth:`output` of the stream (no second pass)."""
        hidden = self.hidden[stream]
        outs, fit, held = gram_pass(self.work, self.inputs[stream], self.index, hidden, names, fit_idx, self.device,
                                    keep_outputs, outputs=outputs, precision=precision)
        if keep_outputs:
            self._outputs[id(hidden)] = outs
        return fit, held


Visit = Callable[[LayerStep], Optional[Mapping[str, Optional[list]]]]


def walk_layers(model: nn.Module, streams: Mapping[str, Union[LayerInputs, Sequence[dict]]], visit: Visit,
                device=None, layers: Optional[int] = None, store_device=None,
                progress: Optional[Progress] = None) -> dict[str, list]:
    """Walk the decoder of ``model`` one layer at a time, calling ``visit(step)`` (:class:`LayerStep`) per
    layer; returns {stream: the states leaving the last layer walked} for the streams still walked.

    ``streams``: {name: captured ``LayerInputs``, or batches (dicts with ``input_ids`` / ``attention_mask``
    ``[B, T]``) captured here by :func:`capture_layer_inputs` — on ``store_device``, with ``progress`` —,
    once per distinct object}; names given the same object start as one shared list. ``visit`` returns
    None or {stream: outputs ``[B, T, H]`` per batch, or None to stop walking that stream} (the same as
    :meth:`LayerStep.advance` on each, which it may call earlier itself); every stream still entering
    when it returns is advanced by the teacher layer (:meth:`LayerStep.output`). ``device``: where each layer
    computes (copied there for its turn, e.g. ``cuda`` for a teacher in CPU memory; default: where it is,
    :func:`module_device` — a layer dispatched by accelerate gives a hook-free copy, the teacher and its
    hooks are left as they are). ``layers``: walk only the first ``layers`` decoder layers.

    Memory: per stream at most its entering and leaving states (lists of ``[B, T, H]`` in the model dtype
    where the inputs are stored, ``store_device``; streams sharing a list hold it once) besides the layer-0
    states its ``LayerInputs`` keeps, one layer's weights on the compute device, and what the callback
    keeps: a step's view, outputs and the callback's locals are released before the next layer (the
    profile's one-layer-of-Grams bound rests on this)."""
    spec = arch_of(model)
    stack = spec.decoder_layers(model)
    inputs, captured = {}, {}
    for name, given in streams.items():
        if not isinstance(given, LayerInputs):
            if id(given) not in captured:
                captured[id(given)] = capture_layer_inputs(model, given, store_device=store_device, progress=progress)
            given = captured[id(given)]
        inputs[name] = given
    del captured
    hidden = {name: inp.hidden for name, inp in inputs.items()}   # one LayerInputs: one shared list
    count = len(stack) if layers is None else min(int(layers), len(stack))
    for i in range(count):
        layer, names = stack[i], list(hidden)
        dev = torch.device(device) if device is not None else module_device(layer)
        step = LayerStep(i, layer, private_view(layer_on(layer, dev)), dev, spec.layer_prefix(i),
                         {name: inputs[name] for name in names}, hidden)
        del hidden   # the step holds the entering states: advancing a stream lets its states go
        for name, outputs in (visit(step) or {}).items():
            step.advance(name, outputs)
        for name in list(step.hidden):
            step.advance(name, step.output(name))
        hidden = {name: step._next[name] for name in names if step._next[name] is not None}
        del step
    return hidden
