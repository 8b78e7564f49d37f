"""Putting routed linears into a model: `build_routed_model`, `unroute_model`, `queries`.

Like `peft.get_peft_model`, every base `nn.Linear` some expert adapts is replaced in place
by a `RoutedLinear` wrapping it (its weights are shared, never copied); the model is then
used exactly as before (forward, `generate`; causal and encoder-decoder alike). Gate
training puts its gated linears in the same way (`build_gated_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from phatgoose.models import passed_cache
from phatgoose.routing import merging, rows
from phatgoose.routing.layer import RoutedLinear, stack_updates
from phatgoose.routing.routers import (
    ArrowRouter,
    FixedRouter,
    GateRouter,
    PromptDecisions,
    PromptRouter,
    SpectralRouter,
    TokenRouter,
    constant_choice,
)
from protocol.methods import ROUTER_NUMERICS, ParamValue, method_spec

if TYPE_CHECKING:
    from phatgoose.embeddings import Embedder
    from phatgoose.expert import Expert


# Where a routed model keeps its routing state (a plain attribute, not a submodule).
STATE_ATTR = "_phatgoose_routing"

ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass
class RoutingState:
    """What `build_routed_model` attached to a model: enough to describe and undo it."""

    method: str
    top_k: int
    expert_names: list[str]
    retrieval: RetrievalChoice | None = None
    prompt: PromptDecisions | None = None  # prompt-level methods (per-example, SMEAR-style)
    router_numerics: int = ROUTER_NUMERICS
    params: dict[str, ParamValue] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)


class RetrievalChoice:
    """The retrieval router's expert per batch row, shared by all routed linears of a model.

    The expert for a query owns its most cosine-similar example among every expert's
    retrieval embeddings. Texts come from `queries(...)` or, failing that, from decoding
    `input_ids` with the tokenizer when a new sequence starts.
    """

    def __init__(
        self, bank: Tensor, owner: Tensor, embedder: Embedder | None, tokenizer: Any
    ) -> None:
        self.bank, self.owner = bank, owner
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.current: Tensor | None = None
        self.pinned = False  # inside `queries(...)`: forwards keep the given texts' choice

    def choose(self, texts: list[str]) -> Tensor:
        """Expert index per text: owner of argmax_m cos(embed(text), example_m)."""
        embedder = self.embedder or _default_embedder
        queries = torch.nn.functional.normalize(torch.as_tensor(embedder(texts)).float(), dim=-1)
        if queries.shape != (len(texts), self.bank.shape[1]):
            raise ValueError(
                f"the embedder returned {list(queries.shape)} for {len(texts)} texts; expected "
                f"[{len(texts)}, {self.bank.shape[1]}] (the experts' embedding width)"
            )
        return self.owner[(queries @ self.bank.T).argmax(dim=-1)]

    def __call__(self) -> Tensor:
        if self.current is None:
            raise RuntimeError(
                "retrieval routing has no query yet: wrap the forward in "
                "`routing.queries(model, texts)` or pass input_ids to a model built with "
                "`tokenizer=`"
            )
        return self.current

    def on_new_input(self, input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
        """Pick experts for a new sequence from its tokens (unless `queries` pinned them)."""
        if self.pinned:
            return
        if input_ids is None or self.tokenizer is None:
            raise RuntimeError(
                "retrieval routing needs the query text: wrap the forward in "
                "`routing.queries(model, texts)`, or build the model with `tokenizer=` and "
                "call it with input_ids"
            )
        keep = attention_mask.bool() if attention_mask is not None else None
        if keep is None:
            keep = input_ids != self.tokenizer.pad_token_id
        texts = [
            self.tokenizer.decode(row[mask].tolist(), skip_special_tokens=True)
            for row, mask in zip(input_ids, keep, strict=True)
        ]
        self.current = self.choose(texts)


def build_routed_model(
    model: ModelT,
    experts: Sequence[Expert],
    method: str = "phatgoose",
    top_k: int = 2,
    *,
    expert: str | None = None,
    embedder: Embedder | None = None,
    tokenizer: Any = None,
    router_numerics: int = ROUTER_NUMERICS,
    params: Mapping[str, object] | None = None,
) -> ModelT:
    """Route `model` over `experts` with `method`, in place, and return it.

    `expert` names the expert for `method="single"`; `embedder` (texts -> [len, e]) and
    `tokenizer` (to decode input_ids when no `queries` are given) serve `"retrieval"`.
    `router_numerics` (protocol.ROUTER_NUMERICS) is how token routers standardise their
    rows: the current rule unless a release made with an older one is reproduced.
    `params` are the method's hyper-parameters (`protocol.methods`: TIES's density, DARE's
    drop rate and seed, SpectR's score); those not given take their defaults, and the
    resolved set is kept in `routing_state(model).params`.
    `"base"` returns the model untouched.
    """
    spec = method_spec(method)
    resolved = spec.resolve_params(params)
    if router_numerics not in range(1, ROUTER_NUMERICS + 1):
        raise ValueError(
            f"router_numerics must be 1 to {ROUTER_NUMERICS} (this library), got {router_numerics}"
        )
    _check_not_routed(model)
    if not spec.takes_experts:
        return model
    experts = list(experts)
    names = [e.name for e in experts]
    if not experts:
        raise ValueError(f"method {method!r} needs at least one expert, got none")
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique, got {names}")
    if spec.takes_top_k and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")

    modules = dict(model.named_modules())
    adapted = {e.name: set(e.module_paths()) for e in experts}
    paths = list(dict.fromkeys(p for e in experts for p in e.module_paths()))
    for e in experts:
        _check_expert_fits(e, modules)

    retrieval = None
    prompt = PromptDecisions() if spec.prompt_level else None
    encoder = encoder_prefix(model)
    if method == "single":
        if expert not in names:
            raise ValueError(f"method 'single' needs expert= one of {names}, got {expert!r}")
        paths = experts[names.index(expert)].module_paths()
    elif method == "merged":
        _check_same_modules(experts, adapted)
    elif method == "retrieval":
        retrieval = RetrievalChoice(*rows.retrieval_bank(experts), embedder, tokenizer)

    # Every routed linear is built before any is put in, so an error leaves the model as it was.
    routed: dict[str, RoutedLinear] = {}
    for path in paths:
        members = [z for z, e in enumerate(experts) if path in adapted[e.name]]
        try:
            base = modules[path]
            assert isinstance(base, nn.Linear)  # _check_expert_fits
            # An encoder's tokens are the prompt; a decoder's are not (PromptRouter).
            reads_prompt = encoder is None or path.startswith(encoder + ".")
            routed[path] = _routed_linear(
                base, path, experts, members, method, top_k, expert, retrieval,
                router_numerics, resolved, _PromptSide(prompt, reads_prompt),
            )  # fmt: skip
        except ValueError as error:
            # Name the module in every error (row builders name it already).
            raise (error if path in str(error) else ValueError(f"{path}: {error}")) from None
    _put_in_place(model, routed)

    new_state = RoutingState(
        method, top_k if spec.takes_top_k else 1, names, retrieval, prompt, router_numerics,
        resolved,
    )  # fmt: skip
    if retrieval is not None:
        new_state.hooks.extend(
            _install_sequence_hooks(
                model, retrieval.on_new_input, lambda: retrieval.current is not None
            )
        )
    if prompt is not None:
        new_state.hooks.extend(install_prompt_hooks(model, prompt))
    setattr(model, STATE_ATTR, new_state)
    return model


def build_gated_model(
    model: ModelT, expert: Expert, gates: dict[str, Tensor] | None = None
) -> ModelT:
    """Put `expert`'s LoRA behind trainable sigmoid gates into `model`, in place (gate training).

    Each adapted linear becomes a `RoutedLinear` over the one expert with a `GateRouter`:
    `y = W u + scale * B A u * sigmoid(v^T u)`, the gate `v` starting at zero unless `gates`
    (path -> [n]) are given. Only the gates are parameters (the LoRA factors are buffers);
    freezing the base is the caller's choice. `unroute_model` puts the linears back.
    """
    _check_not_routed(model)
    modules = dict(model.named_modules())
    _check_expert_fits(expert, modules)
    gated: dict[str, RoutedLinear] = {}
    for path in expert.module_paths():
        base = modules[path]
        assert isinstance(base, nn.Linear)  # _check_expert_fits
        gate = gates[path] if gates is not None else torch.zeros(base.in_features)
        lora_A, lora_B = stack_updates([expert.lora_update(path)])
        gated[path] = RoutedLinear(
            base, lora_A, lora_B, GateRouter(gate), path=path, expert_ids=[0]
        )
    _put_in_place(model, gated)
    setattr(model, STATE_ATTR, RoutingState("gates", 1, [expert.name]))
    return model


def unroute_model(model: ModelT) -> ModelT:
    """Put the original linears back and drop every routing hook; returns the model."""
    for path, module in list(model.named_modules()):
        if isinstance(module, RoutedLinear):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        for hook in state.hooks:
            hook.remove()
        delattr(model, STATE_ATTR)
    return model


def routing_state(model: nn.Module) -> RoutingState | None:
    """The routing a model carries, or None for a model that is not routed."""
    return getattr(model, STATE_ATTR, None)


def reorder_routing(model: nn.Module, rows: Tensor) -> None:
    """Row r of the model's next forwards continues row `rows[r]` of the sequences in
    flight, as after `cache.reorder_cache(rows)`: the decisions that prompt-level methods
    made on the prompts follow their rows. A no-op for every other method (a per-token
    router decides on each token; retrieval re-chooses from `queries`' texts)."""
    state = routing_state(model)
    if state is not None and state.prompt is not None:
        state.prompt.reorder(rows)


def encoder_prefix(model: nn.Module) -> str | None:
    """The module path of an encoder-decoder model's encoder; None for other models."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    encoder = model.get_encoder()  # type: ignore[operator]  # encoder-decoder transformers
    path: str = next(path for path, module in model.named_modules() if module is encoder)
    return path


@contextlib.contextmanager
def queries(model: nn.Module, texts: list[str]) -> Iterator[None]:
    """Within the block, the retrieval router uses `texts` (one per batch row).

    A no-op for models without a retrieval router, so callers can always wrap forwards.
    """
    state = routing_state(model)
    if state is None or state.retrieval is None:
        yield
        return
    retrieval = state.retrieval
    saved = retrieval.current, retrieval.pinned
    retrieval.current, retrieval.pinned = retrieval.choose(list(texts)), True
    try:
        yield
    finally:
        retrieval.current, retrieval.pinned = saved


@dataclass(frozen=True)
class _PromptSide:
    """For prompt-level methods: the model's shared decisions, and whether a module's
    tokens are the prompt's (causal models, encoders) or a decoder's."""

    decisions: PromptDecisions | None
    reads_prompt: bool


def _routed_linear(
    base: nn.Linear,
    path: str,
    experts: list[Expert],
    members: list[int],
    method: str,
    top_k: int,
    expert: str | None,
    retrieval: RetrievalChoice | None,
    router_numerics: int,
    params: dict[str, ParamValue],
    prompt: _PromptSide,
) -> RoutedLinear:
    chosen = [experts[z] for z in members]
    if prompt.decisions is not None:  # per-example PHATGOOSE, SMEAR-style merging
        router: nn.Module = PromptRouter(
            rows.gate_rows(chosen, path),
            top_k if method_spec(method).takes_top_k else None,
            prompt.decisions,
            path=path,
            reads_prompt=prompt.reads_prompt,
            numerics=router_numerics,
        )
        lora_A, lora_B = stack_updates([e.lora_update(path) for e in chosen])
        return RoutedLinear(base, lora_A, lora_B, router, path=path, expert_ids=members)
    if method == "merged":
        lora_A, lora_B = rows.merged_update(chosen, path)
        return RoutedLinear(
            base, lora_A[None], lora_B[None], FixedRouter(constant_choice()), path=path
        )
    if method in ("ties", "dare"):
        # Over the whole release: the experts not adapting `path` are zero updates there
        # (members only would change DARE's average and its per-position seeds).
        if method == "ties":
            lora_A, lora_B = merging.ties_update(
                experts, path, density=float(params["density"]), scale=float(params["scale"])
            )
        else:
            lora_A, lora_B = merging.dare_update(
                experts, path, drop_rate=float(params["drop_rate"]), merge=str(params["merge"]),
                scale=float(params["scale"]), seed=int(params["seed"]),
            )  # fmt: skip
        return RoutedLinear(
            base, lora_A[None], lora_B[None], FixedRouter(constant_choice()), path=path
        )
    if method == "single":
        index = next(z for z in members if experts[z].name == expert)
        lora_A, lora_B = stack_updates([experts[index].lora_update(path)])
        router = FixedRouter(constant_choice())
        return RoutedLinear(base, lora_A, lora_B, router, path=path, expert_ids=[index])
    if method == "retrieval":
        # Every expert is stacked so the chosen index is global; an expert that does not
        # adapt this module contributes a zero update here.
        zero = (torch.zeros(1, base.in_features), torch.zeros(base.out_features, 1), 0.0)
        updates = [e.lora_update(path) if z in members else zero for z, e in enumerate(experts)]
        assert retrieval is not None
        ids = list(range(len(experts)))
        return RoutedLinear(
            base, *stack_updates(updates), FixedRouter(retrieval), path=path, expert_ids=ids
        )
    if method == "spectr":
        # Per expert, its update's right singular vectors (times S for score "spectrum").
        bases = rows.spectral_rows(chosen, path, score=str(params["score"]))
        spectral = SpectralRouter(bases, top_k, weighting=str(params["weighting"]))
        lora_A, lora_B = stack_updates([e.lora_update(path) for e in chosen])
        return RoutedLinear(base, lora_A, lora_B, spectral, path=path, expert_ids=members)
    router_rows = {
        "phatgoose": rows.gate_rows,
        "average_activation": rows.average_activation_rows,
        "arrow": rows.arrow_rows,
    }[method](chosen, path)
    router = (
        ArrowRouter(router_rows, top_k)
        if method == "arrow"
        else TokenRouter(router_rows, top_k, numerics=router_numerics)
    )
    lora_A, lora_B = stack_updates([e.lora_update(path) for e in chosen])
    return RoutedLinear(base, lora_A, lora_B, router, path=path, expert_ids=members)


def _check_not_routed(model: nn.Module) -> None:
    state = routing_state(model)
    if state is not None:
        raise RuntimeError(
            f"this model is already routed ({state.method} over {len(state.expert_names)} "
            "experts); call unroute_model(model) first"
        )


def _check_expert_fits(expert: Expert, modules: dict[str, nn.Module]) -> None:
    # Loaded already (`expert` is one); importing it at the top would load peft.
    from phatgoose.expert import ExpertError

    for path in expert.module_paths():
        linear = modules.get(path)
        if isinstance(linear, RoutedLinear):
            raise RuntimeError(f"{path} is already a routed linear; call unroute_model first")
        if not isinstance(linear, nn.Linear):
            found = "nothing" if linear is None else type(linear).__name__
            raise ExpertError(
                f"expert {expert.name!r} adapts {path}, but the model has {found} there "
                "(expected an nn.Linear; is the expert for another base model?)"
            )
        a, b, _ = expert.lora_update(path)
        n, d = linear.in_features, linear.out_features
        if a.shape[1] != n or b.shape[0] != d:
            raise ExpertError(
                f"expert {expert.name!r} at {path}: update B {list(b.shape)} @ A "
                f"{list(a.shape)} does not fit: the update is {b.shape[0]}x{a.shape[1]} but the "
                f"model's linear is {d}x{n} (out x in; is the expert for another base model?)"
            )


def _put_in_place(model: nn.Module, layers: dict[str, RoutedLinear]) -> None:
    """Replace the linear at each path by its routed linear (which holds the original)."""
    for path, layer in layers.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def _check_same_modules(experts: list[Expert], adapted: dict[str, set[str]]) -> None:
    reference = experts[0].name
    for e in experts[1:]:
        differ = adapted[e.name] ^ adapted[reference]
        if differ:
            raise ValueError(
                f"merged experts need identical architectures, but experts {reference!r} and "
                f"{e.name!r} adapt different modules, e.g. {sorted(differ)[:3]}"
            )


def _install_sequence_hooks(
    model: nn.Module,
    start: Callable[[Tensor | None, Tensor | None], None],
    started: Callable[[], bool],
) -> list[RemovableHandle]:
    """Call `start(input_ids, attention_mask)` whenever new input sequences start: the
    routing methods that decide once per sequence (retrieval, the prompt-level ones).

    Encoder-decoder: the encoder's input starts them (generate() calls the encoder once,
    then only the decoder). Causal: a forward without a filled cache starts them; cached
    decoding steps keep what was decided on the prompt (once `started()`).
    """
    encoder = encoder_prefix(model)
    if encoder is not None:

        def on_encoder(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            start(input_ids, kwargs.get("attention_mask"))

        hook = model.get_submodule(encoder).register_forward_pre_hook(on_encoder, with_kwargs=True)
        return [hook]

    def on_forward(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _has_cache(passed_cache(kwargs)) and started():
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        start(input_ids, kwargs.get("attention_mask"))

    return [model.register_forward_pre_hook(on_forward, with_kwargs=True)]


def install_prompt_hooks(model: nn.Module, prompt: PromptDecisions) -> list[RemovableHandle]:
    """Hooks on `model` that start new decisions of its prompt-level routers when sequences
    start (`_install_sequence_hooks`); an encoder-decoder model also records the encoder's
    output, which the decoder's cross-attention reads (`PromptRouter`). `build_routed_model`
    installs them; a caller swapping `PromptRouter` layers in by hand does it itself."""
    hooks = _install_sequence_hooks(
        model, lambda _ids, mask: prompt.begin(mask), lambda: prompt.epoch > 0
    )
    encoder = encoder_prefix(model)
    if encoder is not None:

        def on_encoder_output(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            states = output[0] if isinstance(output, tuple) else output.last_hidden_state
            prompt.encoder_states = states

        hooks.append(model.get_submodule(encoder).register_forward_hook(on_encoder_output))
    return hooks


def _has_cache(cache: Any) -> bool:
    if cache is None:
        return False
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache)
    return bool(length > 0)


def _default_embedder(texts: list[str]) -> Tensor:
    # Imported on first use: loading MiniLM is only needed for retrieval.
    from phatgoose.embeddings import embed_texts

    return embed_texts(texts)
