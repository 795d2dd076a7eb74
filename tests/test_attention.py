"""The towers' attention: which kernel `model.attention_impl` picks, and the padded path equal to the unpadded one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varcmp_jax import clip
from varcmp_jax.clip import model as clip_model

LENGTHS = (1, 2, 63, 64, 65, 127, 128, 129, 196, 197, 198, 256, 257, 576, 577)


@pytest.fixture
def jax_cudnn_checks(monkeypatch):
  """JAX's own cuDNN attention checks, runnable on CPU: `jax.make_jaxpr` of a cuDNN call runs every Python-side
  check JAX makes (dtype, head dim, lengths, under differentiation too) without a GPU. Returns a function that
  sets the compute capability those checks see."""
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)

  def set_capability(capability: str):
    current = tuple(int(x) for x in capability.split("."))
    as_tuple = lambda c: tuple(int(x) for x in c.split("."))
    monkeypatch.setattr(fused, "check_compute_capability", lambda c: current >= as_tuple(c))
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda c: current == as_tuple(c))

  return set_capability


def _traces_on_cudnn(length: int, head_dim: int, dtype, key_length: int | None = None):
  """Whether JAX traces the gradient of a cuDNN attention call at this length (NotImplementedError: it refuses)."""
  def loss(q, k, v):
    lengths = None if key_length is None else jnp.full((1,), key_length, jnp.int32)
    y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return y.astype(jnp.float32).sum()

  q = jax.ShapeDtypeStruct((1, length, 2, head_dim), dtype)
  try:
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q)
    return True
  except NotImplementedError:
    return False


def test_cudnn_rule_is_jaxs(jax_cudnn_checks):
  # Against JAX's own checks: the unpadded 197 of ViT-B/16 is refused under grad (the error seen on an H200),
  # and for each dtype / head dim / GPU generation the rule says cuDNN exactly where JAX takes the padded call,
  # at the shortest length JAX takes.
  jax_cudnn_checks("9.0")
  assert not _traces_on_cudnn(197, 64, jnp.bfloat16)
  for capability in ("8.0", "9.0"):
    jax_cudnn_checks(capability)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      for head_dim in (8, 12, 64, 128, 136, 256, 264):
        for n in (1, 76, 77, 197):
          length = clip_model.cudnn_attention_length(n, head_dim, dtype, capability)
          key_length = None if length == n else n
          takes = [_traces_on_cudnn(m, head_dim, dtype, key_length=key_length) for m in range(n, n + 3)]
          if length is None:
            assert not any(takes), (capability, dtype, head_dim, n)
          else:
            assert takes[length - n] and not any(takes[:length - n]), (capability, dtype, head_dim, n, length)


def test_auto_traces_on_cudnn_for_every_length(jax_cudnn_checks):
  """`auto` on a Hopper GPU never raises: JAX's checks take the gradient (the stricter, training path) of every
  length 1..577, odd and even lengths each with and without the causal mask."""
  jax_cudnn_checks("9.0")
  for n in range(1, 578):
    causal = (n // 2) % 2 == 1
    implementation, length = clip_model.attention_plan("auto", "cuda", n, 16, jnp.bfloat16, "9.0")
    assert implementation == "cudnn" and length in (n, n + 1)
    loss = lambda q, k, v: clip_model.dot_product_attention(  # pylint: disable=cell-var-from-loop
        q, k, v, causal, implementation, length).astype(jnp.float32).sum()
    q = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.bfloat16)
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q)


def test_attention_plan():
  bf16 = jnp.bfloat16
  plan = clip_model.attention_plan
  assert plan("auto", "cuda", 197, 64, bf16, "9.0") == ("cudnn", 198)
  assert plan("auto", "cuda", 50, 64, bf16, "8.0") == ("cudnn", 50)          # ViT-B/32: already even
  assert plan("cudnn", "cuda", 77, 64, jnp.float16, "8.0") == ("cudnn", 78)  # the causal text tower
  assert plan("xla", "cuda", 197, 64, bf16, "9.0") == ("xla", 197)
  for platform in ("cpu", "tpu", "gpu"):                                      # "gpu" without CUDA: ROCm
    assert plan("auto", platform, 197, 64, bf16) == ("xla", 197)
  assert plan("auto", "cuda", 197, 64, jnp.float32, "9.0") == ("xla", 197)   # cuDNN takes bf16/fp16 only
  assert plan("auto", "cuda", 197, 12, bf16, "9.0") == ("xla", 197)          # head dim not a multiple of 8
  assert plan("auto", "cuda", 197, 256, bf16, "9.0") == ("cudnn", 198)
  assert plan("auto", "cuda", 197, 256, bf16, "8.6") == ("xla", 197)         # 128 at most before Hopper
  assert plan("auto", "cuda", 197, 264, bf16, "9.0") == ("xla", 197)
  assert plan("auto", "cuda", 197, 64, bf16, "10.3") == ("xla", 197)         # cuDNN version unknown there
  for impl, platform, dtype in (("cudnn", "cpu", bf16), ("cudnn", "cuda", jnp.float32)):
    with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' cannot run") as error:
      plan(impl, platform, 197, 64, dtype, "9.0")
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=r"model\.attention_impl='flash'.*'auto', 'xla', 'cudnn'"):
    plan("flash", "cpu", 197, 64, bf16)


def _reference_attention(q, k, v, causal):
  """Softmax attention written out in numpy terms (float64), the independent reference."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_attention_equals_unpadded(causal):
  # The padded path as it runs on a GPU, with XLA underneath: forward and gradients equal the unpadded call.
  rng = np.random.default_rng(0)
  for n, length in ((197, 198), (50, 64), (1, 2)):
    q, k, v = (rng.normal(size=(2, n, 2, 8)).astype(np.float32) for _ in range(3))
    cotangent = rng.normal(size=q.shape).astype(np.float32)

    @jax.jit(static_argnums=4)
    def run(q, k, v, cotangent, pad_to):
      out, vjp = jax.vjp(lambda *qkv: clip_model.dot_product_attention(*qkv, causal, "xla", pad_to), q, k, v)
      return out, vjp(cotangent)

    (padded, padded_grads), (plain, plain_grads) = run(q, k, v, cotangent, length), run(q, k, v, cotangent, n)
    np.testing.assert_allclose(padded, _reference_attention(q, k, v, causal), atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded, plain, atol=1e-6, rtol=0)
    for a, b in zip(padded_grads, plain_grads):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _reference_module(params, x, num_heads, causal):
  """The Attention module in numpy terms (float64): the q/k/v projections, per-head softmax(q k^T / sqrt(d)) v
  (`_reference_attention`), the output projection."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  project = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]
  b, n, width = x.shape
  heads = lambda y: y.reshape(b, n, num_heads, width // num_heads)
  q, k, v = (heads(project(name, np.asarray(x, np.float64))) for name in ("q_proj", "k_proj", "v_proj"))
  return project("out_proj", _reference_attention(q, k, v, causal).reshape(b, n, width))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_auto_on_cpu_is_xla_and_equals_the_reference_at_every_length(causal, monkeypatch):
  """The module on this machine's backend (XLA) at every length against the numpy reference; then with every
  call padded as cuDNN would be on a GPU (one more key, masked), against the same reference."""
  assert clip_model._default_backend() == ("cpu", None)  # pylint: disable=protected-access
  attention = clip_model.Attention(num_heads=2, causal=causal, dtype="float32", param_dtype="float32",
                                   attention_impl="auto")
  rng = np.random.default_rng(0)
  params = attention.init(jax.random.key(0), np.zeros((1, 1, 16), np.float32))
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.5, params)   # biases too
  plans = []
  real_plan = clip_model.attention_plan
  def recorded_plan(*args):
    plans.append(real_plan(*args))
    return plans[-1]
  monkeypatch.setattr(clip_model, "attention_plan", recorded_plan)
  apply = jax.jit(attention.apply)
  for n in LENGTHS:
    x = rng.normal(size=(2, n, 16)).astype(np.float32)
    np.testing.assert_allclose(apply(params, x), _reference_module(params, x, 2, causal), atol=2e-5, rtol=1e-5,
                               err_msg=str(n))
    assert plans[-1] == ("xla", n)
  padded_lengths = []
  def padded_plan(impl, platform, n, *rest):
    padded_lengths.append(n)
    return "xla", n + 1
  monkeypatch.setattr(clip_model, "attention_plan", padded_plan)
  for n in (1, 2, 77, 197):
    x = rng.normal(size=(2, n, 16)).astype(np.float32)
    padded = attention.apply(params, x)       # not jitted: the jit above would reuse its unpadded trace
    np.testing.assert_allclose(padded, _reference_module(params, x, 2, causal), atol=2e-5, rtol=1e-5,
                               err_msg=f"padded {n}")
  assert padded_lengths == [1, 2, 77, 197]
  monkeypatch.setattr(clip_model, "attention_plan", real_plan)
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' cannot run on cpu"):
    attention.clone(attention_impl="cudnn").init(jax.random.key(0), x)


class FakeBackend:
  def __init__(self, platform, platform_version):
    self.platform, self.platform_version = platform, platform_version


@pytest.mark.parametrize("platform, version, capability, expected", [
    ("gpu", "PJRT C API\ncuda 12080", "9.0", ("cuda", "9.0")),
    ("gpu", "PJRT C API\nrocm 60300", "gfx942", ("gpu", None)),      # an AMD GPU: same platform name, no CUDA
    ("tpu", "PJRT C API\nlibtpu 0.0.21", None, ("tpu", None)),
])
def test_the_backend_is_cuda_only_when_its_version_says_cuda(monkeypatch, platform, version, capability, expected):
  """JAX names ROCm and CUDA GPUs alike ("gpu"); only a CUDA one may get cuDNN. What `_default_backend` reads is
  faked, as each backend reports it; the plan for a bf16 ViT-B/16 layer follows (XLA on ROCm and TPU)."""
  class Device:
    compute_capability = capability
  monkeypatch.setattr(clip_model, "jax_backend", type("jax_backend", (), {
      "get_backend": staticmethod(lambda: FakeBackend(platform, version))}))
  monkeypatch.setattr(jax, "local_devices", lambda *args, **kwargs: [Device()])
  got = clip_model._default_backend()  # pylint: disable=protected-access
  assert got == expected
  plan = clip_model.attention_plan("auto", *got[:1], 197, 64, jnp.bfloat16, got[1])
  assert plan == (("cudnn", 198) if expected[0] == "cuda" else ("xla", 197))


TOWERS = clip.CLIPConfig(
    vision=clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=224, patch_size=16),   # 197 tokens, as ViT-B/16
    text=clip.TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=1000),                     # 77 tokens, causal
    projection_dim=16)


def test_towers_padded_equal_unpadded(monkeypatch):
  """Both CLIP towers with every attention call padded as on a GPU (XLA underneath) vs unpadded: fp32, 1e-6."""
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  ids = rng.integers(1, 999, size=(2, 77)).astype(np.int32)
  ids[0, 10], ids[1, 76] = 999, 999
  config = dataclasses.replace(TOWERS, text=dataclasses.replace(TOWERS.text, eos_token_id=999),
                               attention_impl="xla")
  model = clip.CLIP(config)
  params = jax.jit(model.init)(jax.random.key(0), pixels[:1], ids[:1])["params"]

  def loss(p):
    _, patches = model.apply({"params": p}, pixels, method=model.image_tokens)
    _, words, _ = model.apply({"params": p}, ids, method=model.text_tokens)
    return jnp.sum(jnp.sin(patches)) + jnp.sum(jnp.sin(words)), (patches, words)

  def run():
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, plain), plain_grads = run()
  lengths = []

  def padded_plan(impl, platform, seq_len, head_dim, dtype, capability=None):
    lengths.append(seq_len)
    return "xla", clip_model.cudnn_attention_length(seq_len, head_dim, jnp.bfloat16, "9.0")

  monkeypatch.setattr(clip_model, "attention_plan", padded_plan)
  (_, padded), padded_grads = run()
  assert sorted(set(lengths)) == [77, 197]
  for a, b in zip(padded, plain):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  # Gradients reach ~20 here, where float32 steps are 2e-6: 1e-6 of each gradient's scale.
  for (path, a), b in zip(jax.tree.leaves_with_path(padded_grads), jax.tree.leaves(plain_grads)):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_config_default_and_validation():
  from varcmp_jax import config as varcmp_config  # pylint: disable=g-import-not-at-top
  config = varcmp_config.default_config()
  assert config.model.attention_impl == "auto"
  for impl in clip_model.ATTENTION_IMPLS:
    config.model.attention_impl = impl
    varcmp_config.validate(config)
  config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match=r"model\.attention_impl='flash': must be 'auto', 'xla' or 'cudnn'"):
    varcmp_config.validate(config)
