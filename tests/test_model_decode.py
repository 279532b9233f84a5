"""GPT.decode / GPT.new_cache: incremental decoding on the decode kernels against the full
forward at every position (RMSNorm and LayerNorm), bit-identity across thread counts and
across how the tokens are fed, the cache's state, and argument checks."""
import numpy as np
import pytest

from conftest import assert_bitwise_equal, assert_close, thread_counts
from randygpt.config import Config
from randygpt.model import GPT, DecodeCache

VOCAB = 11


def small_model(norm="rmsnorm", block_size=12, seed=0):
    """A random model with weights far from the 0.02 init (std 0.3), so that an error anywhere
    in the cached pass shows in the logits; LayerNorm gains near 1."""
    config = Config(vocab_size=VOCAB, n_embd=12, n_head=3, n_layer=2, block_size=block_size,
                    norm=norm, dropout=0.1)
    model = GPT(config, seed=seed, n_threads=1)
    model.flat_params[:] = np.random.default_rng(seed).normal(0, 0.3, model.num_params)
    if norm == "layernorm":
        for i in range(config.n_layer):
            for which in (1, 2):
                model.params[f"h.{i}.ln{which}.weight"][:] += 1.0
    return model.eval()


def decode_in_chunks(model, ids, sizes, cache=None):
    """Logits of ids decoded len(sizes) calls at a time, concatenated: (len(ids), V)."""
    cache = cache if cache is not None else model.new_cache()
    out, start = [], 0
    for n in sizes:
        out.append(model.decode(ids[start:start + n], cache))
        start += n
    assert start == len(ids) and cache.length == len(ids)
    return np.concatenate(out)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("sizes", [[1] * 12, [5, 1, 1, 3, 2], [12]])
def test_decode_matches_forward_at_every_position(norm, sizes, rng):
    model = small_model(norm)
    ids = rng.integers(0, VOCAB, 12).astype(np.int32)
    got = decode_in_chunks(model, ids, sizes)
    # forward is causal: its logits at position t are those of the sequence's first t + 1
    # tokens. The products sum in another order (the GEMM's one FMA chain, the decode
    # kernel's vector lanes), so the two agree to float32 rounding, not bit for bit.
    expected = model.forward(ids[None])[0]
    assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                 name="decode logits")


def test_decode_is_bit_identical_across_threads_and_feeds(rng):
    model = small_model("layernorm")
    ids = rng.integers(0, VOCAB, 12).astype(np.int32)
    first = decode_in_chunks(model, ids, [1] * 12, model.new_cache(1))
    for nt in thread_counts():
        for sizes in ([1] * 12, [4, 1, 7], [12]):
            cache = model.new_cache(nt)
            got = decode_in_chunks(model, ids, sizes, cache)
            assert_bitwise_equal(got, first, name=f"logits, {nt} threads, calls of {sizes}")


def test_reset_starts_a_new_sequence(rng):
    model = small_model()
    cache = model.new_cache()
    a = model.decode(np.array([1, 2, 3]), cache)
    model.decode(np.array([4, 5]), cache)
    cache.reset()
    assert cache.length == 0
    assert_bitwise_equal(model.decode(np.array([1, 2, 3]), cache), a, name="after reset")


def test_decode_reads_the_weights_in_place(rng):
    model = small_model()
    cache = model.new_cache()
    before = model.decode(np.array([2, 3]), cache)
    model.params["lm_head"][...] *= 2  # decode holds no copy of any weight
    cache.reset()
    assert_close(model.decode(np.array([2, 3]), cache), 2 * before, rtol=1e-6)


def test_new_cache_threads_and_sizes():
    model = small_model(block_size=12)
    assert model.new_cache().n_threads == model.n_threads
    assert model.new_cache(1).n_threads == 1
    cache = model.new_cache()
    assert isinstance(cache, DecodeCache)
    C, L = model.config.n_embd, model.config.n_layer
    assert cache.qkv.shape == (L, 12, 3 * C) and cache.length == 0
    assert cache.nbytes >= cache.qkv.nbytes
    with pytest.raises(ValueError, match="number of threads"):
        model.new_cache(0)


def test_decode_rejects_bad_input():
    model = small_model(block_size=6)
    cache = model.new_cache()
    model.decode(np.array([1, 2, 3, 4]), cache)
    with pytest.raises(ValueError, match=r"cannot append 3 tokens to the cache's 4 \(block_size 6\)"):
        model.decode(np.array([1, 2, 3]), cache)
    with pytest.raises(ValueError, match="idx must be 1-D"):
        model.decode(np.array([[1]]), cache)
    with pytest.raises(TypeError, match="idx must be an integer array"):
        model.decode(np.array([1.0]), cache)
    with pytest.raises(ValueError, match="must not be empty"):
        model.decode(np.array([], dtype=np.int32), cache)
    with pytest.raises(ValueError, match=r"token ids in \[1, 11\], outside \[0, vocab_size=11\)"):
        model.decode(np.array([1, 11]), cache)
    with pytest.raises(ValueError, match="outside"):
        model.decode(np.array([2**32 + 1]), cache)  # not wrapped into range by the int32 copy
    with pytest.raises(TypeError, match="cache must be a DecodeCache"):
        model.decode(np.array([1]), None)
    other = small_model(block_size=7).new_cache()
    with pytest.raises(ValueError, match="another config"):
        model.decode(np.array([1]), other)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        model.decode(np.array([1]), cache)
    model.eval()
    # every refused call left the sequence as it was
    assert cache.length == 4
    assert model.decode(np.array([5, 6]), cache).shape == (2, VOCAB) and cache.length == 6
