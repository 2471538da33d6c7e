"""Our vLLM calls checked against vLLM's real source: vLLM cannot be installed or run here (a CUDA build).

The wheel (``MLV_VLLM_WHEEL``; ``.ci/run`` downloads vllm 0.33.0) is opened with ``zipfile`` and its
sources parsed with ``ast``; ``vllm`` is never imported. :class:`VLLMSource` reads the facts:
``EngineArgs``' fields, ``LLM.__init__`` and ``LLM.generate`` / ``sleep`` / ``wake_up`` /
``collective_rpc`` / ``reset_prefix_cache``, ``SamplingParams``' fields, the prompt TypedDicts
(``vllm/inputs/llm.py``), the keys Qwen2.5-VL's model parses for precomputed video embeddings, and the
weight-name mappers. Our engines then run against a fake ``vllm`` that only records what it is given,
and every keyword, request key and call must exist in the real source (:func:`problems`; a test shows
it catches an unknown keyword).

A few pieces of vLLM are pure enough to run here from the wheel's source: its prompt replacement for
token prompts with Qwen2.5-VL's replacement rule, Qwen2.5-VL's multimodal RoPE positions, and the weight
mappers. Our Qwen2.5-VL requests go through them and must come out as the prompt, the placeholders, the
positions and the parameter names our policy has.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

VLLM_CHECKED = "0.33.0"
LLM_PY, ARGS_PY, SAMPLING_PY = "vllm/entrypoints/llm.py", "vllm/engine/arg_utils.py", "vllm/sampling_params.py"
INPUTS_PY, PROCESSOR_PY = "vllm/inputs/llm.py", "vllm/multimodal/processing/processor.py"
MODELS = "vllm/model_executor/models/"
QWEN25_PY, QWEN2VL_PY, QWEN2_PY, UTILS_PY = (MODELS + n for n in ("qwen2_5_vl.py", "qwen2_vl.py", "qwen2.py", "utils.py"))
LLM_METHODS = ("generate", "sleep", "wake_up", "collective_rpc", "reset_prefix_cache")


# -- reading the wheel ----------------------------------------------------------------------------------
class _StandIn:
    """What a name vLLM imports stands for when a piece of its source runs here: fine in annotations."""

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self


class _Bare(ast.NodeTransformer):
    """Drops annotations and decorators, so a function runs without the names they refer to."""

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.returns, node.decorator_list = None, []
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
        return node


class VLLMSource:
    """Facts about vLLM's Python API read from its wheel, without importing vllm."""

    def __init__(self, wheel: str):
        import zipfile

        self._zip = zipfile.ZipFile(wheel)
        meta = next(n for n in self._zip.namelist() if n.endswith(".dist-info/METADATA"))
        self.metadata = self._zip.read(meta).decode()
        self.version = next(line.split(":", 1)[1].strip() for line in self.metadata.splitlines()
                            if line.startswith("Version:"))
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self._zip.read(path).decode(), filename=path)
        return self._trees[path]

    def cls(self, path: str, name: str) -> ast.ClassDef:
        for node in self.tree(path).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        raise LookupError(f"vLLM {self.version}: no class {name} in {path}")

    def method(self, path: str, cls: str, name: str) -> ast.FunctionDef:
        for node in self.cls(path, cls).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return node
        raise LookupError(f"vLLM {self.version}: no method {cls}.{name} in {path}")

    def fields(self, path: str, name: str) -> set[str]:
        """Class-level annotated names of ``name`` (a dataclass, msgspec Struct or TypedDict), bases in ``path`` included."""
        node = self.cls(path, name)
        out = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        local = {n.name for n in self.tree(path).body if isinstance(n, ast.ClassDef)}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in local:
                out |= self.fields(path, base.id)
        return out

    def signature(self, path: str, cls: str, name: str) -> inspect.Signature:
        """The signature of ``cls.name`` without ``self`` (names and kinds; a default stands for itself)."""
        a, P = self.method(path, cls, name).args, inspect.Parameter
        positional = a.posonlyargs + a.args
        defaults = [P.empty] * (len(positional) - len(a.defaults)) + [...] * len(a.defaults)
        params = [P(x.arg, P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD, default=d)
                  for i, (x, d) in enumerate(zip(positional, defaults))]
        params += [P(a.vararg.arg, P.VAR_POSITIONAL)] if a.vararg else []
        params += [P(x.arg, P.KEYWORD_ONLY, default=P.empty if d is None else ...)
                   for x, d in zip(a.kwonlyargs, a.kw_defaults)]
        params += [P(a.kwarg.arg, P.VAR_KEYWORD)] if a.kwarg else []
        return inspect.Signature(params[1:])

    def class_value(self, path: str, cls: str, attr: str):
        """The class attribute ``attr``: a literal, or the literal keyword arguments of the call assigned to it."""
        for s in self.cls(path, cls).body:
            targets = s.targets if isinstance(s, ast.Assign) else [s.target] if isinstance(s, ast.AnnAssign) else []
            if attr in [t.id for t in targets if isinstance(t, ast.Name)]:
                if isinstance(s.value, ast.Call):
                    return {k.arg: ast.literal_eval(k.value) for k in s.value.keywords}
                return ast.literal_eval(s.value)
        raise LookupError(f"vLLM {self.version}: no attribute {cls}.{attr} in {path}")

    def assigned(self, path: str, cls: str) -> set[str]:
        """The ``self.X`` its methods assign (the modules and parameters the class builds)."""
        return {t.attr for n in ast.walk(self.cls(path, cls)) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for target in (n.targets if isinstance(n, ast.Assign) else [n.target]) for t in ast.walk(target)
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}

    def run(self, path: str, cls: str | None, names, namespace=None) -> dict:
        """vLLM's own functions (methods of ``cls``) ``names``, compiled here without annotations in ``namespace``."""
        body = self.cls(path, cls).body if cls else self.tree(path).body
        nodes = [_Bare().visit(copy.deepcopy(n)) for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
        if len(nodes) != len(names):
            raise LookupError(f"vLLM {self.version}: {path} lacks some of {names}")
        ns = dict(namespace or {})
        exec(compile(ast.fix_missing_locations(ast.Module(nodes, [])), path, "exec"), ns)
        return {n: ns[n] for n in names}

    def run_prefix(self, path: str, until: str) -> dict:
        """The top-level statements of ``path`` before ``until``, run here; vLLM's imports stand in (``_StandIn``)."""
        module = types.ModuleType("_vllm_source_" + path.replace("/", "_")[:-3])
        ns = module.__dict__
        sys.modules[module.__name__] = module  # dataclasses look their module up while the classes are made
        try:
            for node in self.tree(path).body:
                targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
                if getattr(node, "name", None) == until or until in targets:
                    return ns
                if isinstance(node, ast.If):  # the TYPE_CHECKING imports
                    continue
                if isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] == "vllm"):
                    ns.update({a.asname or a.name: _StandIn() for a in node.names})
                    continue
                exec(compile(ast.Module([node], []), path, "exec"), ns)
        finally:
            del sys.modules[module.__name__]
        raise LookupError(f"vLLM {self.version}: no {until} in {path}")


@dataclasses.dataclass
class VLLMAPI:
    """What our calls are checked against (see :func:`read_api`)."""

    version: str
    llm_keywords: set[str]
    """``LLM.__init__``'s parameters and ``EngineArgs``' fields (its ``**kwargs`` become ``EngineArgs(...)``)."""
    engine_fields: set[str]
    sampling_fields: set[str]
    methods: dict[str, inspect.Signature]
    prompt_keys: dict[str, set[str]]
    """Keys of ``TokensPrompt`` and ``EmbedsPrompt``."""
    video_keys: set[str]
    """Video keys Qwen2.5-VL's model parses (``_parse_and_validate_video_input``) that its processor carries."""
    video_required: set[str]
    """The video embedding fields a request must hold (its data parser's ``embedding_fields``)."""
    video_dims: dict[str, tuple]
    """The dims of each field of ``Qwen2_5_VLVideoEmbeddingInputs`` (its ``TensorShape``: names or sizes)."""
    modalities: set[str]


def read_api(src: VLLMSource) -> VLLMAPI:
    engine_fields = src.fields(ARGS_PY, "EngineArgs")
    llm_init = set(src.signature(LLM_PY, "LLM", "__init__").parameters) - {"kwargs"}
    parsed = src.method(QWEN25_PY, "Qwen2_5_VLForConditionalGeneration", "_parse_and_validate_video_input")
    popped = {c.args[0].value for c in ast.walk(parsed) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
              and c.func.attr == "pop" and isinstance(c.func.value, ast.Name) and c.func.value.id == "kwargs"}

    def dict_keys(node):  # keyword names of the dict(...) calls in a function
        return {k.arg for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                and c.func.id == "dict" for k in c.keywords if k.arg}

    carried = dict_keys(src.method(QWEN25_PY, "Qwen2_5_VLMultiModalProcessor", "_get_mm_fields_config"))
    carried |= dict_keys(next(n for n in src.tree(QWEN2VL_PY).body
                              if isinstance(n, ast.FunctionDef) and n.name == "_create_qwen2vl_field_factory"))
    limits = src.method(QWEN2VL_PY, "Qwen2VLProcessingInfo", "get_supported_mm_limits")
    dims = {s.target.id: tuple(ast.literal_eval(a) for a in s.annotation.slice.elts[1].args)
            for s in src.cls(QWEN25_PY, "Qwen2_5_VLVideoEmbeddingInputs").body
            if isinstance(s, ast.AnnAssign) and isinstance(s.annotation, ast.Subscript)
            and getattr(s.annotation.value, "id", None) == "Annotated"}
    return VLLMAPI(
        version=src.version, llm_keywords=llm_init | engine_fields, engine_fields=engine_fields,
        sampling_fields=src.fields(SAMPLING_PY, "SamplingParams"),
        methods={m: src.signature(LLM_PY, "LLM", m) for m in LLM_METHODS},
        prompt_keys={k: src.fields(INPUTS_PY, k) for k in ("TokensPrompt", "EmbedsPrompt")},
        video_keys=popped & carried,
        video_required=set(src.class_value(QWEN2VL_PY, "Qwen2VLMultiModalDataParser", "embedding_fields")["video"]),
        video_dims=dims,
        modalities=set(ast.literal_eval(next(n for n in ast.walk(limits) if isinstance(n, ast.Return)).value)),
    )


# -- the recording fake and the check -------------------------------------------------------------------
def recording_vllm(calls: list):
    """A ``vllm`` module whose ``LLM`` and ``SamplingParams`` record ``(name, args, kwargs)`` in ``calls``."""

    class LLM:
        def __init__(self, *args, **kwargs):
            calls.append(("LLM", args, kwargs))

        def __getattr__(self, name):
            def method(*args, **kwargs):
                calls.append((name, args, kwargs))
                if name == "generate":  # one token per sample
                    out = types.SimpleNamespace(token_ids=[5], logprobs=[{5: types.SimpleNamespace(logprob=-1.0)}],
                                                finish_reason="stop")
                    return [types.SimpleNamespace(outputs=[out] * p.kwargs["n"]) for p in args[1]]
                return None

            return method

    class SamplingParams:
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs
            calls.append(("SamplingParams", args, kwargs))

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def problems(calls: list, api: VLLMAPI) -> list[str]:
    """Everything in ``calls`` that vLLM's source does not define (empty: all of it fits)."""
    out = []
    for what, args, kwargs in calls:
        if what == "LLM":
            out += [f"LLM({k}=...): neither an LLM.__init__ parameter nor an EngineArgs field"
                    for k in sorted(set(kwargs) - api.llm_keywords)]
            out += [f"LLM(limit_mm_per_prompt={{{m!r}: ...}}): not a modality of the model"
                    for m in sorted(set(kwargs.get("limit_mm_per_prompt", {})) - api.modalities)]
            continue
        if what == "SamplingParams":
            out += [f"SamplingParams({k}=...): not a field" for k in sorted(set(kwargs) - api.sampling_fields)] + (
                ["SamplingParams: positional arguments"] if args else [])
            continue
        if what not in api.methods:
            out.append(f"LLM.{what}: not a method of LLM we checked")
            continue
        try:
            bound = api.methods[what].bind(*args, **kwargs)
        except TypeError as e:
            out.append(f"LLM.{what}{tuple(kwargs)}: {e}")
            continue
        for i, request in enumerate(bound.arguments.get("prompts", ()) if what == "generate" else ()):
            kind = "EmbedsPrompt" if "prompt_embeds" in request else "TokensPrompt"
            out += [f"prompts[{i}][{k!r}]: not a key of {kind}" for k in sorted(set(request) - api.prompt_keys[kind])]
            video = (request.get("multi_modal_data") or {}).get("video")
            if video is not None:
                out += [f"prompts[{i}] video {k!r}: Qwen2.5-VL does not parse it"
                        for k in sorted(set(video) - api.video_keys)]
                out += [f"prompts[{i}] video: lacks {k!r}" for k in sorted(api.video_required - set(video))]
    return out


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def src() -> VLLMSource:
    wheel = os.environ.get("MLV_VLLM_WHEEL", "")
    if not wheel or not os.path.isfile(wheel):
        pytest.skip(f"vLLM {VLLM_CHECKED}'s wheel not available: set MLV_VLLM_WHEEL to the file fetched with "
                    f"'pip download --no-deps vllm=={VLLM_CHECKED}' (.ci/run does)")
    return VLLMSource(wheel)


@pytest.fixture(scope="module")
def api(src) -> VLLMAPI:
    return read_api(src)


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory) -> str:
    from tests.rl.test_engine_vllm import QWEN_CFG, write_qwen_tokenizer

    return write_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen_tok")), QWEN_CFG.video_token_id)


@pytest.fixture
def calls(monkeypatch) -> list:
    record: list = []
    monkeypatch.setitem(sys.modules, "vllm", recording_vllm(record))
    return record


def _zero_state(weight_map) -> dict:
    """A Megatron full state of zeros with every tensor ``weight_map`` maps (what a sync reads)."""
    return {name: torch.zeros(shape) for name, shape in weight_map.megatron_shapes.items()}


def _video_prompt(cfg, num_frames=40, text_before=(9, 7), text_after=(8, 10, 11, 12, 13)):
    """(RLPrompt, VideoPrompt) of a prompt with one video of ``num_frames`` 56 x 84 frames (keyed 'clip')."""
    from megatron_longvideo.rl.rollout import RLPrompt, video_prompts

    frames = torch.zeros(num_frames, 3, 56, 84)
    n = cfg.num_video_tokens(num_frames, 56, 84)
    ids = torch.tensor([*text_before, *[cfg.video_token_id] * n, *text_after])
    prompt = RLPrompt(videos=(frames,), prompt_ids=ids, ground_truth=None, content_ids=("clip",))
    video = torch.randn(n, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(0))  # [N/4, h]
    return prompt, video_prompts(cfg, [prompt], [[video]], [["key-of-clip"]])[0]


# -- the tests ------------------------------------------------------------------------------------------
def test_the_wheel_is_the_checked_vllm(src, api):
    assert src.version == VLLM_CHECKED, f"this test states vLLM {VLLM_CHECKED}'s API; the wheel is {src.version}"
    assert len(api.engine_fields) > 200
    assert {"enable_prompt_embeds", "enable_mm_embeds", "enable_prefix_caching"} <= api.engine_fields
    assert "pad_token_id" not in api.llm_keywords, "vLLM takes no pad_token_id"
    # the configs we write are transformers 5's (rope_parameters): vLLM must read them with transformers 5
    pins = [line for line in src.metadata.splitlines() if line.startswith("Requires-Dist: transformers")]
    assert pins and all(">=5" in line for line in pins), pins


def test_qwen2_engine_calls_exist_in_vllm(api, calls):
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from tests.rl.test_engine_vllm import CFG

    engine = build_engine("vllm", CFG, seed=3)
    engine.generate([torch.randn(5, 64), torch.randn(3, 64)],
                    SamplingConfig(n=2, temperature=0.7, top_p=0.9, stop_token_ids=[4], seed=1, logprobs=True))
    engine.sync_weights(_zero_state(engine.weight_map))
    engine.sleep(level=1)
    engine.wake()
    assert {c[0] for c in calls} >= {"LLM", "SamplingParams", *LLM_METHODS}, [c[0] for c in calls]
    assert calls[0][2]["enable_prefix_caching"] is True
    assert problems(calls, api) == [], f"against vLLM {api.version}"


def test_one_engine_per_rank_of_a_torchrun_job_is_vllms_external_launcher(src, api, calls, monkeypatch):
    """Inside a multi-rank job every rank starts its own engine on its GPU: vLLM's ``external_launcher``
    backend (a value of vLLM's ``DistributedExecutorBackend``), with the memory share given or budgeted."""
    import torch.distributed as dist

    from megatron_longvideo.rl.engines import build_engine
    from tests.rl.test_engine_vllm import CFG

    backends = next(n.value for n in src.tree("vllm/config/parallel.py").body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "DistributedExecutorBackend" for t in n.targets))
    assert "external_launcher" in {ast.literal_eval(e) for e in backends.slice.elts}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    build_engine("vllm", CFG, seed=3, gpu_memory_utilization=0.4)
    kwargs = calls[0][2]
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["tensor_parallel_size"] == 1
    assert kwargs["gpu_memory_utilization"] == 0.4
    assert problems(calls, api) == [], f"against vLLM {api.version}"


def test_qwen25vl_engine_calls_and_requests_exist_in_vllm(api, calls, qwen_tokenizer):
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from tests.rl.test_engine_vllm import QWEN_CFG

    engine = build_engine("vllm", QWEN_CFG, tokenizer=qwen_tokenizer, max_video_tokens=4096)
    engine.generate_videos([_video_prompt(QWEN_CFG)[1]], SamplingConfig(n=2, max_new_tokens=4))
    kwargs = calls[0][2]
    assert kwargs["enable_mm_embeds"] and kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 0}
    assert not kwargs["skip_tokenizer_init"] and "enable_prompt_embeds" not in kwargs
    assert kwargs["max_num_batched_tokens"] == 4096  # sizes vLLM's encoder cache for long videos
    request = next(c for c in calls if c[0] == "generate")[1][0][0]
    assert set(request) == {"prompt_token_ids", "multi_modal_data", "multi_modal_uuids"}
    assert problems(calls, api) == [], f"against vLLM {api.version}"
    # each tensor as the model's schema has it, once vLLM batches a request's items (the first dim)
    video, sizes = request["multi_modal_data"]["video"], {}
    assert set(api.video_dims) >= set(video), api.video_dims
    for key, t in video.items():
        dims = api.video_dims[key]
        assert t.dim() == len(dims), f"{key}: {tuple(t.shape)} for the schema's {dims}, vLLM {api.version}"
        for dim, n in zip(dims, t.shape):
            assert (n == dim) if isinstance(dim, int) else (sizes.setdefault(dim, n) == n), f"{key}: {dim} = {n}"
    assert sizes["nv"] == 1 and sizes["hs"] == QWEN_CFG.llm.hidden_size, sizes


@pytest.mark.parametrize("mistake", ["pad_token_id", "request_key", "generate_keyword"])
def test_the_check_catches_what_vllm_does_not_define(api, calls, mistake):
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from tests.rl.test_engine_vllm import CFG

    engine = build_engine("vllm", CFG, **({"pad_token_id": 0} if mistake == "pad_token_id" else {}))
    if mistake == "request_key":
        build = engine.build_requests
        engine.build_requests = lambda embeds: [dict(r, positions=None) for r in build(embeds)]
    if mistake == "generate_keyword":
        engine.llm.generate(engine.build_requests([torch.randn(2, 64)]), [], max_tokens=4)
    engine.generate([torch.randn(2, 64)], SamplingConfig())
    found = problems(calls, api)
    expected = {"pad_token_id": "LLM(pad_token_id=...)", "request_key": "prompts[0]['positions']",
                "generate_keyword": "LLM.generate('max_tokens',)"}[mistake]
    assert any(p.startswith(expected) for p in found), found


def test_vllm_expands_our_qwen_prompt_into_the_training_prompt(src, calls, qwen_tokenizer):
    """vLLM's replacement for token prompts (its code, run here) on our request gives our expanded ids."""
    from megatron_longvideo.rl.engines import build_engine
    from tests.rl.test_engine_vllm import QWEN_CFG

    from transformers import AutoTokenizer

    prompt, video_prompt = _video_prompt(QWEN_CFG)
    engine = build_engine("vllm", QWEN_CFG, tokenizer=qwen_tokenizer)
    request = engine.build_video_requests([video_prompt])[0]
    proc = src.run_prefix(PROCESSOR_PY, until="MultiModalIsCached")
    names = {"PromptReplacement": proc["PromptReplacement"], "partial": functools.partial, "torch": torch}
    updates_of = src.run(QWEN25_PY, "Qwen2_5_VLMultiModalProcessor", ["_get_prompt_updates"], names)["_get_prompt_updates"]
    with open(os.path.join(engine.model_dir, "preprocessor_config.json")) as f:  # the folder vLLM's processor reads
        merge_size = json.load(f)["merge_size"]
    vocab = AutoTokenizer.from_pretrained(qwen_tokenizer).get_vocab()
    info = types.SimpleNamespace(  # what _get_prompt_updates asks the processor info for
        get_hf_processor=lambda **kw: types.SimpleNamespace(image_token="<|image_pad|>", video_token="<|video_pad|>"),
        get_image_processor=lambda **kw: types.SimpleNamespace(merge_size=merge_size),
        get_tokenizer=lambda: types.SimpleNamespace(get_vocab=lambda: vocab),
        ctx=types.SimpleNamespace(get_mm_config=lambda: types.SimpleNamespace(video_pruning_rate=None)))
    video = request["multi_modal_data"]["video"]
    item = {"video_grid_thw": types.SimpleNamespace(data=video["video_grid_thw"][0])}  # vLLM's batched item: [3]
    updates = updates_of(types.SimpleNamespace(info=info), None, {}, {"video": [item]})
    update = next(u for u in updates if u.modality == "video")

    def expand(ids):
        return proc["_apply_token_matches_with_placeholders"](ids, {"video": [[update.resolve(0)]]})

    ids, result, placeholders = expand(request["prompt_token_ids"])
    assert ids == prompt.prompt_ids.tolist(), f"vLLM {src.version} expands our ids to another prompt"
    [placeholder] = placeholders["video"]
    assert placeholder.start_idx == 2 and result == {"video": [0]}
    assert len(placeholder.tokens) == video["video_embeds"].shape[0]  # one embedding per placeholder
    # why the engine collapses the run: the expanded prompt would grow by N - 1 tokens
    assert len(expand(prompt.prompt_ids.tolist())[0]) == len(prompt.prompt_ids) + len(placeholder.tokens) - 1


def test_vllm_positions_equal_the_policy_positions(src, calls, qwen_tokenizer):
    """vLLM's Qwen2.5-VL M-RoPE (its code, run here) from our request equals the policy's rollout positions,
    on a video long enough that the text-after-video rules differ."""
    import dataclasses as dc

    from megatron_longvideo.rl.engines import build_engine
    from tests.rl.test_engine_vllm import QWEN_CFG

    prompt, video_prompt = _video_prompt(QWEN_CFG, num_frames=40)  # 20 temporal patches: time outruns the 2 x 3 grid
    engine = build_engine("vllm", QWEN_CFG, tokenizer=qwen_tokenizer)
    request = engine.build_video_requests([video_prompt])[0]
    fns = src.run(QWEN25_PY, "Qwen2_5_VLForConditionalGeneration", ["iter_mm_grid_thw", "get_mrope_input_positions"],
                  {"np": np, "torch": torch})
    with open(os.path.join(engine.model_dir, "config.json")) as f:  # what vLLM reads the time step from
        vision_config = types.SimpleNamespace(**json.load(f)["vision_config"])
    model = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision_config))
    model.iter_mm_grid_thw = functools.partial(fns["iter_mm_grid_thw"], model)
    video = request["multi_modal_data"]["video"]
    feature = types.SimpleNamespace(modality="video", mm_position=types.SimpleNamespace(offset=2), data={
        "video_grid_thw": types.SimpleNamespace(data=video["video_grid_thw"][0]),
        "second_per_grid_ts": types.SimpleNamespace(data=video["second_per_grid_ts"][0])})
    theirs, delta = fns["get_mrope_input_positions"](model, prompt.prompt_ids.tolist(), [feature])
    ours = QWEN_CFG.positions(prompt.prompt_ids[None], list(prompt.videos))[0][:, 0]  # what rollout_positions gives
    assert torch.equal(theirs.long(), ours), f"vLLM {src.version}'s positions differ from the policy's"
    assert delta == int(ours.max()) + 1 - len(prompt.prompt_ids)
    spatial = dc.replace(QWEN_CFG, text_after="spatial").positions(prompt.prompt_ids[None], list(prompt.videos))[0][:, 0]
    assert not torch.equal(theirs.long(), spatial), "the prompt does not tell the two text-after rules apart"


def test_synced_weight_names_reach_vllm_parameters(src, calls, qwen_tokenizer):
    """Every name a sync sends, through vLLM's mappers (their code, run here), names a module vLLM's Qwen2 builds."""
    from megatron_longvideo.rl.engines import build_engine
    from tests.rl.test_engine_vllm import CFG, QWEN_CFG

    map_name = src.run(UTILS_PY, "WeightsMapper", ["_map_name_with_shard"], {"logger": _StandIn()})["_map_name_with_shard"]

    def mapper(path, cls):
        rules = dict(orig_to_new_renaming=[], orig_to_new_regex={}, orig_to_new_substr={}, orig_to_new_stacked={},
                     orig_to_new_prefix={}, orig_to_new_suffix={})
        rules.update(src.class_value(path, cls, "hf_to_vllm_mapper"))
        return lambda name: map_name(types.SimpleNamespace(**rules), name)

    qwen_vl, qwen2 = mapper(QWEN25_PY, "Qwen2_5_VLForConditionalGeneration"), mapper(QWEN2_PY, "Qwen2Model")
    # the module each attribute holds in vLLM's Qwen2 (None: a leaf with .weight / .bias); each is assigned there
    tree = {"Qwen2ForCausalLM": {"model": "Qwen2Model", "lm_head": None},
            "Qwen2Model": {"embed_tokens": None, "layers": "Qwen2DecoderLayer", "norm": None},
            "Qwen2DecoderLayer": {"self_attn": "Qwen2Attention", "mlp": "Qwen2MLP", "input_layernorm": None,
                                  "post_attention_layernorm": None},
            "Qwen2Attention": {"qkv_proj": None, "o_proj": None}, "Qwen2MLP": {"gate_up_proj": None, "down_proj": None}}
    for cls, attrs in tree.items():
        missing = set(attrs) - src.assigned(QWEN2_PY, cls)
        assert not missing, f"vLLM {src.version}: {cls} builds no {missing}"
    assert "language_model" in src.assigned(QWEN25_PY, "Qwen2_5_VLForConditionalGeneration")

    def reaches(name: str) -> bool:  # AutoWeightsLoader: by the first name part into the child's load_weights
        head, rest = name.split(".", 1)
        if head not in tree["Qwen2ForCausalLM"]:
            return False
        if head == "model":
            rest = qwen2(rest)[0]  # Qwen2Model.load_weights applies its stacked-shard mapper
        cls, parts = tree["Qwen2ForCausalLM"][head], rest.split(".")
        if cls is None:
            return parts == ["weight"]
        for i, part in enumerate(parts):
            if part.isdigit():
                continue
            if part not in tree[cls]:
                return False
            cls = tree[cls][part]
            if cls is None:
                return parts[i + 1:] in (["weight"], ["bias"])
        return False

    plain, video = build_engine("vllm", CFG), build_engine("vllm", QWEN_CFG, tokenizer=qwen_tokenizer)
    sent = {"Qwen2 engine": [n for n, _ in plain.hf_weights(_zero_state(plain.weight_map))],
            "Qwen2.5-VL engine": [qwen_vl(n)[0] for n, _ in video.hf_weights(_zero_state(video.weight_map))]}
    for engine, names in sent.items():
        if engine == "Qwen2.5-VL engine":
            assert all(n.startswith("language_model.") for n in names), names[:3]
            names = [n[len("language_model."):] for n in names]
        lost = [n for n in names if not reaches(n)]
        assert not lost and len(names) > 10, f"{engine}, vLLM {src.version}: {lost[:5]}"
    for path, cls in ((QWEN25_PY, "Qwen2_5_VLForConditionalGeneration"), (QWEN2_PY, "Qwen2ForCausalLM")):
        src.signature(path, cls, "load_weights").bind(weights=[])  # how WeightSyncExtension calls it
    # WeightSyncExtension runs in vLLM's GPU worker: self.model_runner.get_model() (V1 and V2 runners)
    assert "model_runner" in src.assigned("vllm/v1/worker/gpu_worker.py", "Worker")
    for path in ("vllm/v1/worker/gpu_model_runner.py", "vllm/v1/worker/gpu/model_runner.py"):
        src.signature(path, "GPUModelRunner", "get_model").bind()

