"""Leave a model exactly as it was found: modes, buffers and the global RNG.

Measuring geometric complexity must not disturb what it measures. Running a
model in eval mode (the default) touches the ``training`` flags, and the
buffers of modules that write one in every pass (a call counter); running it
in train mode moves BatchNorm running statistics and draws dropout masks from
the global generator. :func:`preserved` undoes all of that.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "batch_norm_couples",
    "compiled",
    "cpu_seeded",
    "differentiable_attention",
    "eager",
    "in_this_thread",
    "kept_buffers",
    "loader_generators",
    "no_attention_fast_path",
    "preserved",
    "put_back",
    "rewound",
    "rng_carried_on",
    "rngs_kept",
    "rngs_set_apart",
    "snapshot",
    "written_buffers",
]


def batch_norm_couples(modules: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether a BatchNorm among ``modules`` couples the samples of a batch.

    A BatchNorm in train mode normalises with the batch's statistics; so does
    one that keeps no running statistics (``track_running_stats=False``), in
    eval mode too. Either way the batch-sum trick for per-sample Jacobians
    does not apply.

    Args:
        modules: a model, or its modules as the list :func:`preserved`
            yields (walking a large model's tree costs about a microsecond a
            module, so a caller that has the list passes it).

    Returns:
        ``True`` if any ``_BatchNorm`` among them is training or has
        ``running_mean is None``.
    """
    if isinstance(modules, nn.Module):
        modules = modules.modules()
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
        for m in modules
    )


@contextlib.contextmanager
def preserved(model: nn.Module, *, mode: str) -> Iterator[list[nn.Module]]:
    """Run a block with ``model`` in ``mode`` and restore it afterwards.

    In train mode every buffer (BatchNorm ``running_mean``, ``running_var``,
    ``num_batches_tracked``) is snapshot and put back, and the global RNG state
    (CPU, and CUDA for the model's devices) is restored, so dropout leaves no
    trace. In eval mode BatchNorm writes nothing and dropout draws nothing;
    the buffers of other modules (a call counter, an EMA, a quantization
    observer may write one in any mode) are put back if they changed.

    Train mode is what the model's own ``train()`` sets where a module
    overrides it (fine-tuning code that keeps BatchNorm frozen: its
    BatchNorm stays in eval mode here too, as in training), else every
    module's flag set to True; a ``requires_grad`` the override changes is
    put back with the flags.

    Threads: the modes and buffers are the model's own, shared by every
    thread. Blocks for one model (or models that share a module) in several
    threads at once take turns: a block waits until another thread's has
    put the model back (otherwise the first out switched the model back to
    train mode under the other's pass, and the last out left it in the
    eval mode it had found). Blocks nested in one thread, and eval-mode
    blocks for other models, do not wait; train-mode blocks take turns with
    every other train-mode block, as they share the global RNG (see
    :data:`_GLOBAL_RNG`). A thread that runs the model itself meanwhile
    (training it) finds it in ``mode``: measure a copy there.

    Args:
        model: the module; every submodule's own ``training`` flag is restored,
            so a model that mixes train and eval submodules comes back mixed.
        mode: ``"eval"`` or ``"train"``; the mode the block runs in.

    Yields:
        ``list(model.modules())``; the block runs with the model in ``mode``.
    """
    modules = list(model.modules())
    _refuse_uninitialised(model, modules)
    # train mode forks and replays the one global RNG: see _GLOBAL_RNG
    rng = _GLOBAL_RNG if mode == "train" else contextlib.nullcontext()
    with rng, _turn(modules), _parametrizations_cache_kept(modules):
        yield from _preserved(model, modules, mode)


def _refuse_uninitialised(model: nn.Module, modules: list[nn.Module]) -> None:
    """Refuse a model with lazy modules that no forward pass has initialised.

    The block's first pass would initialise them: a ``LazyLinear`` becomes a
    ``Linear``, with weights drawn from the global RNG, and the caller's model
    is another one (``finite_difference`` and ``measure`` did that; the other
    methods failed on torch's "uninitialized parameter" error).

    Raises:
        ValueError: a module of ``model`` still has uninitialised parameters.
    """
    lazy = nn.modules.lazy.LazyModuleMixin
    if not any(isinstance(m, lazy) and m.has_uninitialized_params() for m in modules):
        return
    names = [
        repr(name)
        for name, m in model.named_modules()
        if isinstance(m, lazy) and m.has_uninitialized_params()
    ]
    raise ValueError(
        f"the model's lazy modules {', '.join(names)} are not initialised yet: "
        "measuring would initialise them (their weights drawn from the global "
        "RNG), changing the model; run one forward pass, model(x), first"
    )


@contextlib.contextmanager
def _parametrizations_cache_kept(modules: list[nn.Module]) -> Iterator[None]:
    """A block after which the modules' cached parametrized tensors are as found.

    Inside the caller's ``torch.nn.utils.parametrize.cached()`` block, the
    first read of a parametrized weight is cached for the rest of that block.
    A measurement's passes read it under ``no_grad`` (finite differences,
    ``measure``'s pilot), or in train mode from buffers put back after: left
    in the cache, that weight was the one the caller's next pass used, with
    no graph (its parameters got no gradient) or from another state.
    """
    if not parametrize._cache_enabled:
        yield
        return
    keys = [
        (id(m), name)
        for m in modules
        if parametrize.is_parametrized(m)
        for name in m.parametrizations
    ]
    found = {key: parametrize._cache[key] for key in keys if key in parametrize._cache}
    try:
        yield
    finally:
        cache = parametrize._cache  # as the caller's block holds it now
        for key in keys:
            if key in found:
                cache[key] = found[key]
            else:
                cache.pop(key, None)


def _preserved(
    model: nn.Module, modules: list[nn.Module], mode: str
) -> Iterator[list[nn.Module]]:
    """:func:`preserved`'s block, run while this thread holds ``modules``."""
    flags = [(m, m.training) for m in modules]
    train = mode == "train"
    if not train:
        # eval mode moves no BatchNorm statistics and, for standard modules,
        # draws no random number: skip the RNG snapshot and BatchNorm's
        # buffers, which cost as much as a small forward pass; a buffer of
        # another module may be written in any mode (a call counter)
        saved = written_buffers(modules)
        try:
            for module, flag in flags:
                if flag:
                    _set_training(module, False)
            yield modules
        finally:
            for module, flag in flags:
                if module.training != flag:
                    _set_training(module, flag)
            put_back(saved)
        return
    # BatchNorm writes nothing (see kept_buffers); any other buffer a custom
    # module changes is copied back, and only if it changed, so that buffers
    # saved in a graph the caller still differentiates keep their versions
    saved = snapshot(modules)
    requires: list[tuple[nn.Parameter, bool]] = []
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            if any(type(m).train is not nn.Module.train for m in modules):
                # the model's own train() (nn.Module.train calls the
                # children's, overrides included); flipping the flags
                # unfroze a BatchNorm its train() keeps in eval mode
                requires = [(p, p.requires_grad) for p in model.parameters()]
                model.train()
            else:
                for module, _ in flags:
                    module.training = True
            with kept_buffers(model):
                yield modules
    finally:
        for module, flag in flags:
            module.training = flag
        for p, flag in requires:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        put_back(saved)


#: Held by the blocks that fork the global RNG and replay it between passes
#: (train-mode preserved(), rng_carried_on()). The RNG is one for the
#: process: a train-mode measurement in another thread drew dropout masks
#: from it between one measurement's replayed passes (a finite difference's
#: base and probe passes ran different masks: GC read 1e7 times too large),
#: and put back, on leaving, a state from before the other's draws.
_GLOBAL_RNG = threading.RLock()
_TURNS = threading.Condition(threading.Lock())
#: module -> (the thread whose preserved() block holds it, how deeply nested)
_HOLDERS: dict[nn.Module, tuple[int, int]] = {}


@contextlib.contextmanager
def _turn(modules: list[nn.Module]) -> Iterator[None]:
    """Hold ``modules`` for this thread, once no other thread holds any of them.

    All or nothing, under one lock: two threads never hold part each.
    """
    me = threading.get_ident()
    with _TURNS:
        while any(_HOLDERS.get(m, (me, 0))[0] != me for m in modules):
            _TURNS.wait()
        for m in modules:
            _HOLDERS[m] = (me, _HOLDERS.get(m, (me, 0))[1] + 1)
    try:
        yield
    finally:
        with _TURNS:
            for m in modules:
                depth = _HOLDERS[m][1] - 1
                if depth:
                    _HOLDERS[m] = (me, depth)
                else:
                    del _HOLDERS[m]
            _TURNS.notify_all()


def _cuda_devices(model: nn.Module) -> list[int]:
    """The indices of the CUDA devices that hold ``model``'s tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def rng_carried_on(model: nn.Module) -> Iterator[Callable[..., None]]:
    """A block whose train-mode calls draw fresh dropout masks, one after another.

    A train-mode :func:`preserved` (and each pass it replays) puts the global
    RNG back, so that the caller's RNG never moves; but then successive calls,
    the batches of one ``measure``, all start from the same state and draw
    the same dropout masks: a data set's train-mode GC averaged over one draw
    of masks (four copies of 8 samples, measured 8 at a time, gave four
    identical rows of per-sample values). The block runs on a copy of the
    global RNG (CPU, and CUDA for the model's devices), put back at its end;
    the function it yields reseeds that copy from a draw of its own, so that
    the next call draws fresh masks, reproducibly from ``torch.manual_seed``.

    Args:
        model: the module measured (its CUDA devices' RNGs are kept too).

    Yields:
        ``advance(salt=0)``: call it between two calls that should draw
        apart. A ``salt`` (a count of samples seen) gives states apart from
        those of another salt where the copy starts from the same state (the
        updates of a metric between which nothing moves the global RNG).
    """
    cuda = _cuda_devices(model)

    def advance(salt: int = 0) -> None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        seed = (seed + salt * 0x9E3779B97F4A7C15) % 2**63
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)

    with _GLOBAL_RNG, torch.random.fork_rng(devices=cuda):
        yield advance


_Snapshot = list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]]


def snapshot(modules: Iterable[nn.Module]) -> _Snapshot:
    """``(module, name, buffer, copy)`` for every buffer the modules own.

    A buffer registered empty (``None``: a cache a forward pass fills) is
    ``(module, name, None, None)``, to be emptied again.
    """
    return [
        (m, name, b, None if b is None else b.detach().clone())
        for m in modules
        for name, b in m._buffers.items()
    ]


def written_buffers(modules: Iterable[nn.Module]) -> _Snapshot:
    """A snapshot of the buffers a forward pass may write outside BatchNorm.

    A call counter, an EMA, spectral normalisation's power iteration may write
    theirs in any mode; BatchNorm writes nothing in eval mode or under
    :func:`kept_buffers`, and its buffers are left out (copying them costs as
    much as a small forward pass). :func:`put_back` restores them.
    """
    return snapshot(
        m
        for m in modules
        if m._buffers and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def put_back(saved: _Snapshot) -> None:
    """Put each buffer back as it was: the same tensor, holding the same values.

    A buffer replaced by a new tensor (``self.calls = self.calls + 1``) gets
    its own tensor back; one written in place gets its values back, copied
    only where they changed; one registered empty (``None``) is emptied again.
    """
    if not saved:
        return
    with torch.no_grad():
        for module, name, buf, value in saved:
            # _buffers is no dict in a TorchScript module: no .get
            if name not in module._buffers or module._buffers[name] is not buf:
                module._buffers[name] = buf
            if buf is None or _same(buf, value):
                continue
            if _layout(buf) != _layout(value):
                # resized (or cast) in place, ``buf.data = ...``: copy_ would
                # broadcast the old values into the new shape
                buf.data = value.clone()
            else:
                buf.copy_(value)


def in_this_thread(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, for a module hook that acts in the thread adding it alone.

    A measurement hooks the caller's model for its length (``output=``,
    ``wrt=``, the rewind of buffers, the checks); the model's hooks are
    shared by every thread, so another thread running the model meanwhile
    (serving predictions with it in eval mode) ran into them: its forward
    pass stopped by the ``output=`` hook's exception, its submodule output
    taken for the measurement's. In any other thread the returned hook does
    nothing (returns ``None``, which leaves the pass alone).
    """
    me = threading.get_ident()

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == me:
            return hook(*args, **kwargs)
        return None

    return hooked


@contextlib.contextmanager
def rewound(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every forward pass of ``model`` in the block starts from the buffers found.

    For the several passes that one measurement makes (jvp, finite
    differences) in train mode: a module that writes a buffer in each pass
    (spectral normalisation's power iteration, an EMA) would otherwise give
    each pass a different function, and a finite difference would take the
    change between passes for a derivative. BatchNorm is left out: under
    :func:`kept_buffers`, and in eval mode, it writes nothing.

    Args:
        model: the module whose calls are rewound (a forward pre-hook).
        modules: its modules, as :func:`preserved` yields them.

    Yields:
        Nothing.
    """
    saved = written_buffers(modules)
    if not saved or isinstance(model, torch.jit.ScriptModule):  # no hooks there
        yield
        return
    handle = model.register_forward_pre_hook(
        in_this_thread(lambda *_: put_back(saved)), prepend=True
    )
    try:
        yield
    finally:
        handle.remove()


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Run an extra forward pass that leaves BatchNorm's running statistics alone.

    A penalty that runs its own forward pass during training would otherwise
    count the batch twice in the running statistics; and writing to those
    buffers at all (an update, or copying old values back) bumps their version,
    which breaks the backward pass of the task loss's graph, where BatchNorm
    saved them. So train-mode BatchNorm layers normalise with the batch's
    statistics, as they do anyway, but with ``track_running_stats`` switched
    off for the block: nothing is written. Train-mode InstanceNorm layers
    with running statistics (which normalise by each sample's statistics and
    only write the running ones) run without them. Eval-mode layers write
    nothing.

    Yields:
        Nothing.
    """
    bns, instance = [], []
    for m in model.modules():
        if not (isinstance(m, _NORMS) and m.training and m.track_running_stats):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bns.append(m)
        else:
            instance.append(
                (m, m._buffers.get("running_mean"), m._buffers.get("running_var"))
            )
    try:
        for m in bns:
            m.track_running_stats = False
        # InstanceNorm hands its running statistics to the kernel whatever
        # track_running_stats says; in train mode it normalises by each
        # sample's own statistics and only writes them: hidden for the block
        for m, _, _ in instance:
            m._buffers["running_mean"] = m._buffers["running_var"] = None
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
        for m, mean, var in instance:
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var


def _same(buf: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``buf`` still holds ``value`` exactly, NaN matching NaN.

    ``torch.equal`` calls NaN unequal to itself, so an unchanged buffer that
    holds a NaN (running statistics after a step that overflowed) would be
    written back, bumping its version and breaking a graph that saved it.
    """
    if _layout(buf) != _layout(value):
        return False
    if torch.equal(buf, value):
        return True
    if not (buf.is_floating_point() or buf.is_complex()):
        return False
    return torch.allclose(buf, value, rtol=0.0, atol=0.0, equal_nan=True)


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    """What a buffer resized or cast in place changes: shape, dtype, device."""
    return t.shape, t.dtype, t.device


def _set_training(module: nn.Module, flag: bool) -> None:
    """``module.training = flag``, cheaply where that is the same thing.

    For a plain ``nn.Module`` the flag is an instance attribute, and writing
    the instance dict skips ``nn.Module.__setattr__``'s checks (on a small MLP
    they cost about a tenth of a measurement); a module with its own
    ``__setattr__`` (TorchScript keeps the flag in C++), or whose class makes
    ``training`` a property (its setter keeps the flag elsewhere: written to
    the instance dict, it was never seen, and the module ran in train mode
    in an eval-mode measurement), gets the real one.
    """
    # nn.Module.__init__ sets the flag with object.__setattr__: it is in the
    # instance dict unless the class's property took it
    instance = module.__dict__
    if type(module).__setattr__ is nn.Module.__setattr__ and "training" in instance:
        instance["training"] = flag
    else:
        module.training = flag


def _attention_switches() -> list[tuple[bool, Any, Any]]:
    """``(setting, query, switch)`` for each attention kernel this torch has.

    The fused kernels (flash, memory-efficient, cuDNN) are switched off and
    the math kernel on; the switches are global flags, read on the CPU too.
    """
    cuda = torch.backends.cuda
    found = []
    for name in ("flash", "mem_efficient", "cudnn", "math"):
        query = getattr(cuda, f"{name}_sdp_enabled", None)
        switch = getattr(cuda, f"enable_{name}_sdp", None)
        if query is not None and switch is not None:
            found.append((name == "math", query, switch))
    return found


_ATTENTION_SWITCHES = _attention_switches()


_MHA = getattr(torch.backends, "mha", None)  # torch >= 2.1's fast-path switch
_FAST_PATH = (
    (_MHA.get_fastpath_enabled, _MHA.set_fastpath_enabled)
    if hasattr(_MHA, "set_fastpath_enabled")
    else None
)


class _GlobalSwitch:
    """A process-global setting that measuring blocks hold, counted.

    The first block in sets it and saves what it was; the last block out
    puts that back; blocks in between, nested in one thread or running at
    once in several (two models measured in threads, a measurement inside
    a forward hook of another), find it set. Each block saving and restoring
    the setting itself switched it back under a block still running in
    another thread (the attention fast path back on, mid-measurement), and
    the last one out restored the setting an earlier block had made, not
    the user's (the fused attention kernels left off for good).
    """

    def __init__(self, switch_on: Callable[[], Any], restore: Callable[[Any], None]):
        self._switch_on, self._restore = switch_on, restore
        self._depth, self._saved = 0, None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with _SWITCH_LOCK:
            if self._depth == 0:
                self._saved = self._switch_on()
            self._depth += 1
        try:
            yield
        finally:
            with _SWITCH_LOCK:
                self._depth -= 1
                if self._depth == 0:
                    saved, self._saved = self._saved, None
                    self._restore(saved)


def _fast_path_off() -> bool:
    assert _FAST_PATH is not None
    was = _FAST_PATH[0]()
    _FAST_PATH[1](False)
    return was


def _math_kernel_only() -> list[bool]:
    saved = [query() for _, query, _ in _ATTENTION_SWITCHES]
    try:
        for setting, _, switch in _ATTENTION_SWITCHES:
            switch(setting)
    except BaseException:
        _kernels_back(saved)
        raise
    return saved


def _kernels_back(saved: list[bool]) -> None:
    for (_, _, switch), was in zip(_ATTENTION_SWITCHES, saved, strict=True):
        switch(was)


def _stance_eager() -> Any:
    stance = torch.compiler.set_stance("force_eager")  # set when made
    stance.__enter__()
    return stance


_SWITCH_LOCK = threading.RLock()
_GLOBAL_SWITCHES = {
    "fast_path": _GlobalSwitch(
        _fast_path_off, lambda was: _FAST_PATH[1](was) if _FAST_PATH else None
    ),
    "kernels": _GlobalSwitch(_math_kernel_only, _kernels_back),
    "stance": _GlobalSwitch(_stance_eager, lambda s: s.__exit__(None, None, None)),
}


@contextlib.contextmanager
def no_attention_fast_path() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` in Python.

    In eval mode, where nothing they take requires grad (a pass under
    ``no_grad``, as finite differences run, or a forward-mode pass through
    frozen weights), these layers take a fused "fast path". It has no
    forward-mode derivative (``"jvp"`` failed on a frozen transformer), and a
    ``TransformerEncoder`` given a ``src_key_padding_mask`` runs it on a nested
    tensor and returns zeros at the padded positions, where the Python path
    returns what attention computes there: a model that reads those positions
    (a mean over all of them) is another function without grad than with it,
    and finite differences measured that other function (0.68 times the GC of
    a model that averaged every position). The switch is
    ``torch.backends.mha.set_fastpath_enabled``, a global flag.

    Yields:
        Nothing.
    """
    if _FAST_PATH is None:
        yield
        return
    with _GLOBAL_SWITCHES["fast_path"].held():
        yield


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run attention by its math kernel, which autograd can differentiate twice.

    ``scaled_dot_product_attention``'s fused kernels (flash attention on the
    CPU in float32, and on CUDA) have no double backward and no forward-mode
    derivative: a GC or gradient-norm penalty, or the ``"jvp"`` method, fails
    on a transformer with "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented". The kernel is chosen when the forward pass runs, so the
    passes that are differentiated twice run inside this block. It costs
    nothing for models without attention, and a few microseconds to enter:
    it sets the same switches as ``torch.nn.attention.sdpa_kernel(
    SDPBackend.MATH)``, directly (that function spends about 40 µs a call in
    Python, which a small model's training step notices). The layers' fused
    fast path, which has no forward-mode derivative either, is switched off
    too (:func:`no_attention_fast_path`).

    Yields:
        Nothing.
    """
    with _GLOBAL_SWITCHES["kernels"].held(), no_attention_fast_path():
        yield


def compiled(modules: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether a module among ``modules`` runs a ``torch.compile`` graph.

    A ``torch.compile(module)`` wrapper, or a module compiled in place
    (``module.compile()``).

    Args:
        modules: a model, or the list of its modules (as for
            :func:`batch_norm_couples`).
    """
    if isinstance(modules, nn.Module):
        modules = modules.modules()
    return any(
        type(m).__name__ == "OptimizedModule" or m._compiled_call_impl is not None
        for m in modules
    )


def eager() -> contextlib.AbstractContextManager[Any]:
    """A block where compiled modules and functions run their Python code.

    A compiled graph's backward cannot be differentiated again (a GC or
    gradient-norm penalty's parameter gradient), has no batched backward and
    no forward-mode derivative, and ignores hooks added after compiling; run
    eagerly, the function is the same. ``torch.compiler.set_stance`` exists
    from torch 2.6; before it, a null context.
    """
    if getattr(torch.compiler, "set_stance", None) is None:
        return contextlib.nullcontext()
    return _GLOBAL_SWITCHES["stance"].held()


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators a ``DataLoader`` and its samplers draw from (maybe none)."""
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """A block that draws from the global CPU generator seeded with ``seed``.

    For building a model reproducibly (PyTorch's default initialisation
    draws from that generator): its state comes back afterwards, and the
    block holds :data:`_GLOBAL_RNG`, as a model built in another thread
    meanwhile reseeded the generator between this one's layers. The CPU's
    generator alone: ``torch.manual_seed`` would reseed every CUDA
    generator too, which ``fork_rng(devices=[])`` does not put back.
    """
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def rngs_kept(generators: Sequence[torch.Generator] = ()) -> Iterator[None]:
    """A block after which the RNGs are as before it.

    Torch's global CPU generator, numpy's and Python's (a dataset's
    augmentation may draw from any of them), and ``generators`` (a loader's
    own, :func:`loader_generators`): iterating the caller's loader to measure
    it, or to take a subset, must not change what training draws next.

    Yields:
        Nothing.
    """
    # the block draws from (and rngs_set_apart sets) the one global RNG: not
    # between the replayed passes of a train-mode block in another thread
    with _GLOBAL_RNG:
        states = [g.get_state() for g in generators]
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                yield
        finally:
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)
            np.random.set_state(np_state)
            random.setstate(py_state)


def rngs_set_apart(
    steps: Iterator[Any], generators: Sequence[torch.Generator] = ()
) -> Iterator[Any]:
    """``steps`` run on RNGs of their own, apart from the caller's.

    Each step runs on the RNG states the previous step left (torch's global
    CPU generator, numpy's, Python's and ``generators``), so the iteration
    draws what it would draw run alone, and the caller's RNGs are as before
    it after every step. Restoring the caller's states around each step
    alone (:func:`rngs_kept` per step) would start every step from the same
    states: a generator of random batches yielded one batch over and over,
    and a ``RandomSampler(replacement=True, generator=g)`` the same 32
    indices in every chunk it draws.

    Yields:
        The items of ``steps``.
    """
    own: tuple[Any, ...] | None = None  # the iteration's states between steps
    while True:
        with rngs_kept(generators):
            if own is not None:
                torch.set_rng_state(own[0])
                np.random.set_state(own[1])
                random.setstate(own[2])
                for g, state in zip(generators, own[3], strict=True):
                    g.set_state(state)
            try:
                item = next(steps)
            except StopIteration:
                return
            finally:
                own = (
                    torch.get_rng_state(),
                    np.random.get_state(),
                    random.getstate(),
                    [g.get_state() for g in generators],
                )
        yield item
