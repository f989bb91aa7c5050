"""The native CPU kernel (csrc/, backend="cpu") against the float64 reference.

The first test to need the extension builds it (about 20-60 s on 2 cores, then cached).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import renio_kernels
from renio_kernels import reference
from renio_kernels.ops import backends
from renio_kernels.ops.cpu import native as cpu
from renio_kernels.ops.divergences import DIVERGENCES
from renio_kernels.ops.rows import DenseTeacher, DivergenceParams
from tests.helpers import GRAD_RTOL, LOSS_RTOL, make_inputs, ref_loss_and_grad, rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def divergence_cases(jsd_beta: float = 0.5) -> list:
    """One ``(divergence, beta)`` per registry entry: the beta it is selected by (``jsd_beta``
    inside the JSD's interval; 0.0, unused, for a divergence chosen by name only)."""
    cases = []
    for spec in DIVERGENCES.values():
        if isinstance(spec.beta, tuple):
            assert spec.beta[0] < jsd_beta < spec.beta[1]
            beta = jsd_beta
        else:
            beta = 0.0 if spec.beta is None else spec.beta
        cases.append(pytest.param(spec.name, beta, id=spec.name))
    return cases


def ref_loss_and_grad_for(s, t, labels, grad_scale=1.0, divergence=None, **kw):
    """``ref_loss_and_grad`` for any divergence of the registry, in float64."""
    return ref_loss_and_grad(s, t, labels, grad_scale, divergence=divergence, **kw)


@pytest.fixture(autouse=True)
def _extension(request):
    """Build once (cached); fail if a compiler exists but the build broke, else skip."""
    if "without_extension" in request.fixturenames or cpu.load_extension() is not None:
        return
    if shutil.which("c++") or shutil.which("g++"):
        pytest.fail(
            f"a compiler is present but the extension did not build: {cpu.extension_error()}"
        )
    pytest.skip(f"no C++ compiler here; the fallback is tested below ({cpu.extension_error()})")


def _run(s, t, labels, grad_scale=1.7, **kw):
    """Loss and student gradient of ``grad_scale * loss`` through backend='cpu'."""
    s = s.detach().clone().requires_grad_()
    out = renio_kernels.renio_loss(s, t, labels, backend="cpu", **kw)
    (out * grad_scale).backward()
    return out, s.grad


def _check(s, t, labels, dtype=torch.float32, **kw):
    loss, grad = _run(s, t, labels, **kw)
    ref, ref_grad = ref_loss_and_grad_for(s, t, labels, grad_scale=1.7, **kw)
    assert grad.dtype == s.dtype
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL[dtype] * abs(ref.item()) + 1e-7, (loss, ref)
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]
    return loss, grad


def test_declares_every_divergence():
    # Python maps a name to the C++ mode by its index in this list; the kernels implement all.
    assert set(cpu.divergences()) == set(DIVERGENCES)
    assert backends.resolve_backend("auto", torch.device("cpu"), "tvd").name == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("divergence", "beta"), divergence_cases())
@pytest.mark.parametrize("token_clip", [None, 0.05, 0.002])
def test_parity_options(dtype, divergence, beta, token_clip):
    # 0.05 clamps a few JSD/KL terms, 0.002 about a third of the TVD's (one per row at least).
    s, t, labels = make_inputs(3, 6, 123, dtype=dtype, seed=1)
    kw = dict(divergence=divergence, beta=beta, token_clip=token_clip, temperature=1.3)
    _check(s, t, labels, dtype, **kw)


@pytest.mark.parametrize("vocab", [1, 5, 31, 123, 1271])
@pytest.mark.parametrize(("divergence", "beta"), divergence_cases(jsd_beta=0.3))
def test_odd_vocab_and_padded_teacher(vocab, divergence, beta):
    s, t, labels = make_inputs(2, 5, vocab, teacher_vocab=vocab + 17, seed=vocab)
    _check(s, t, labels, divergence=divergence, beta=beta, token_clip=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_boundaries_and_temperature(dtype):
    # 4100 columns: two full 2048-wide tiles plus a 4-column remainder.
    s, t, labels = make_inputs(2, 3, 4100, teacher_vocab=4160, dtype=dtype, seed=2)
    _check(s, t, labels, dtype, beta=0.7, temperature=0.6, token_clip=0.02)


@pytest.mark.parametrize("ignore", ["row", "none"])
def test_ignored_rows_and_custom_index(ignore):
    s, t, labels = make_inputs(3, 5, 64, ignore=ignore, ignore_index=7, seed=3)
    loss, grad = _check(s, t, labels, ignore_index=7, weight_norm="clamp")
    ignored = labels == 7
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_ignored_batch(dtype):
    s, t, labels = make_inputs(2, 4, 50, ignore="all", dtype=dtype)
    loss, grad = _run(s, t, labels, token_clip=0.05)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_non_contiguous_views_and_int32_labels():
    s_full, t_full, l_full = make_inputs(2, 7, 300, teacher_vocab=320, seed=4)
    s, t, labels = s_full[:, :-1], t_full[:, 1:], l_full[:, 1:]
    assert not s.is_contiguous() and not labels.is_contiguous()
    loss, grad = _check(s, t, labels, beta=0.5, token_clip=0.05)
    kw = dict(beta=0.5, token_clip=0.05)
    loss_c, grad_c = _run(s.contiguous(), t[..., :300].contiguous(), labels.contiguous(), **kw)
    loss_32, grad_32 = _run(s, t, labels.int(), **kw)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)
    assert torch.equal(loss, loss_32) and torch.equal(grad, grad_32)


def test_mixed_dtypes_and_single_row():
    s, t, labels = make_inputs(1, 1, 77, seed=5)
    _check(s, t.bfloat16(), labels, beta=0.2)


def test_sampled_reverse_kl():
    s, t, labels = make_inputs(3, 5, 211, teacher_vocab=230, seed=6)
    s = s.requires_grad_()
    loss = renio_kernels.sampled_reverse_kl_loss(s, t, labels, temperature=1.4, backend="cpu")
    (loss * 1.7).backward()
    s64 = s.detach().double().requires_grad_()
    ref = reference.sampled_reverse_kl_loss(s64, t.double(), labels, temperature=1.4)
    (ref * 1.7).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    assert rel_err(s.grad, s64.grad) <= 1e-5


def test_large_row():
    s, t, labels = make_inputs(1, 3, 262144, scale=4.0, seed=7)
    _check(s, t, labels, token_clip=0.05)


def test_thread_count_independence():
    s, t, labels = make_inputs(4, 9, 3000, seed=8)
    kw = dict(beta=0.5, token_clip=0.05)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(s, t, labels, **kw)
        torch.set_num_threads(2)
        two = _run(s, t, labels, **kw)
    finally:
        torch.set_num_threads(threads)
    # Each row is summed in one fixed order by one thread, so the results are identical.
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize(("divergence", "beta"), divergence_cases())
def test_inf_logits_where_the_weighting_probability_is_zero(divergence, beta):
    s, t, labels = make_inputs(2, 4, 40, seed=9)
    s[0, 2, 3] = t[0, 2, 3] = float("-inf")  # both -inf at one column
    if divergence != "reverse_kl":  # (the reverse KL of a student mass where pt = 0 is inf)
        t[0, 1, :5] = float("-inf")  # teacher prob 0: its terms are 0, never 0 * -inf
    if divergence != "forward_kl":
        s[1, 1, 7] = float("-inf")  # student prob 0: likewise
    loss, grad = _check(s, t, labels, divergence=divergence, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_nan_and_dead_rows_give_nan():
    s, t, labels = make_inputs(2, 4, 40, seed=9)
    s_nan = s.clone()
    s_nan[1, 2, 11] = float("nan")
    loss, grad = _run(s_nan, t, labels, beta=0.5, token_clip=0.05)  # NaN survives the clip
    assert torch.isnan(loss)
    assert torch.isnan(grad[1, 2]).all()

    s_dead = s.clone()
    s_dead[1, 2] = float("-inf")  # a whole row -inf: no distribution, NaN (documented)
    loss, _ = _run(s_dead, t, labels)
    assert torch.isnan(loss)


def test_shift_invariance_and_identical_inputs():
    s, t, labels = make_inputs(2, 4, 500, seed=10)
    s, t = s + 1e4, t + 1e4
    # In fp32, ls = x - lse cancels two ~1e4 numbers (ulp 1e-3), in every backend: bound our error
    # by twice the chunked torch backend's, both against the float64 reference.
    ref, _ = ref_loss_and_grad(s, t, labels, beta=0.5)
    ours = renio_kernels.renio_loss(s, t, labels, beta=0.5, backend="cpu")
    theirs = renio_kernels.renio_loss(s, t, labels, beta=0.5, backend="torch")
    assert torch.isfinite(ours)
    assert abs(ours.item() - ref.item()) <= 2 * abs(theirs.item() - ref.item()) + 1e-6
    same, _ = _run(s, s, labels, beta=0.5)
    assert -1e-6 <= same.item() <= 1e-6


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_tvd_at_exact_ties(grad_in_forward):
    # ps == pt bit for bit at every column: e = 0 and the subgradient sign(0) = 0, so the loss and
    # the gradient are exactly 0 (with the clip on too: e = 0 is inside [0, clip]).
    s, _, labels = make_inputs(2, 4, 2100, seed=14)
    padded = torch.cat([s, torch.randn(2, 4, 9)], dim=-1)
    with renio_kernels.config.cpu_grad_in_forward(grad_in_forward):
        for token_clip in (None, 0.002):
            loss, grad = _run(s, padded, labels, divergence="tvd", token_clip=token_clip)
            assert loss.item() == 0.0
            assert torch.equal(grad, torch.zeros_like(grad))


def test_out_of_range_label_unchecked_gives_nan():
    s, t, labels = make_inputs(2, 3, 20, ignore="none", seed=11)
    labels[1, 1] = 20
    stats = cpu.renio_fwd_cpu(s, DenseTeacher(t), labels, DivergenceParams())
    for x in (stats.ls_x, stats.lt_x, stats.d):
        assert torch.isnan(x[1, 1]) and not torch.isnan(x[0]).any()
    for loss_fn in (renio_kernels.renio_loss, renio_kernels.sampled_reverse_kl_loss):
        assert torch.isnan(loss_fn(s, t, labels, backend="cpu", check_labels=False))


def test_no_grad_forward_and_auto_picks_cpu():
    assert backends.resolve_backend("auto", torch.device("cpu")).name == "cpu"
    s, t, labels = make_inputs(2, 3, 90, seed=12)
    with torch.no_grad():
        loss = renio_kernels.renio_loss(s.requires_grad_(), t, labels, backend="auto")
    ref, _ = ref_loss_and_grad(s, t, labels)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.fixture
def poisoned_empty():
    """Make every torch.empty / at::empty (the kernels' outputs included) come back NaN-filled."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(3)).all()
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_write_every_output(poisoned_empty, dtype):
    s, t, labels = make_inputs(3, 5, 70, ignore="row", dtype=dtype, seed=13)
    params = DivergenceParams(beta=0.5, token_clip=0.05)
    stats = cpu.renio_fwd_cpu(s, DenseTeacher(t), labels, params, with_divergence=False)
    assert stats.c is None and not torch.isnan(stats.lse_s).any()
    assert torch.equal(stats.d, torch.zeros_like(stats.d))
    stats = cpu.renio_fwd_cpu(s, DenseTeacher(t), labels, params)
    for x in stats:
        assert not torch.isnan(x).any()
    ignored = labels == -100
    assert (stats.d[ignored] == 0).all() and (stats.lse_s[ignored] == 0).all()
    gd, gx = torch.randn(labels.shape), torch.randn(labels.shape)
    for grads in ((gd, None), (None, gx), (gd, gx)):
        grad = cpu.renio_bwd_cpu(s, DenseTeacher(t), labels, params, stats, *grads)
        assert not torch.isnan(grad).any()
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


def fresh_process(monkeypatch):
    """As if the extension had not been loaded yet in this process (restored afterwards)."""
    monkeypatch.setitem(cpu._state, "lib", cpu._UNTRIED)
    monkeypatch.setitem(cpu._state, "error", None)


@pytest.fixture
def without_extension(monkeypatch):
    """A fresh process on a machine where the build fails (no compiler)."""

    def no_compiler(*args, **kwargs):
        raise RuntimeError("simulated: c++ not found")

    fresh_process(monkeypatch)
    monkeypatch.setenv("CXX", "/nonexistent/renio-test/c++")
    monkeypatch.setattr(cpu, "_build", no_compiler)


def test_fallback_when_the_build_fails(without_extension):
    with pytest.warns(RuntimeWarning, match="could not be built.*no C\\+\\+ compiler.*install one"):
        assert backends.resolve_backend("auto", torch.device("cpu")).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert backends.resolve_backend("auto", torch.device("cpu")).name == "torch"
        s, t, labels = make_inputs(2, 3, 30)
        loss = renio_kernels.renio_loss(s, t, labels)
        with pytest.raises(ValueError, match="backend='cpu' needs the native extension"):
            renio_kernels.renio_loss(s, t, labels, backend="cpu")
    assert "simulated" in cpu.extension_error()
    ref, _ = ref_loss_and_grad(s, t, labels)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_build_lock_handling(tmp_path):
    # A build killed midway leaves torch's lock file; torch alone would wait on it forever.
    cpu.wait_for_build_lock(tmp_path)  # no lock: returns at once
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 400
    os.utime(lock, (old, old))  # left by a build killed 400 s ago
    with pytest.warns(RuntimeWarning, match="removing the build lock.*interrupted"):
        cpu.wait_for_build_lock(tmp_path, stale_after_s=300.0)
    assert not lock.exists()
    # A fresh lock is another process building: wait for it to be released, leave it to them.
    lock.touch()
    releaser = threading.Timer(1.0, lock.unlink)
    releaser.start()
    t0 = time.monotonic()
    cpu.wait_for_build_lock(tmp_path, stale_after_s=300.0)
    assert 0.9 <= time.monotonic() - t0 < 30
    releaser.join()


# --- where the build lives, and read-only extension directories ---------------------------------


def read_only(root: Path, monkeypatch) -> list[Path]:
    """Make ``root`` read-only: chmod a-w (enough for a normal user) and, since root ignores
    permission bits, every write, create, rename or delete under it fails with EROFS. Returns
    the directories whose mode changed."""
    root = root.resolve()
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(0o555)

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError, OSError):
            return False

    def deny(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_os_open, real_open = os.open, io.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and under(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)

    def guard(real):
        def guarded(path, *args, **kwargs):
            if under(path):
                deny(path)
            return real(path, *args, **kwargs)

        return guarded

    for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    return dirs


@pytest.fixture
def writable_again():
    """Give tmp_path cleanup its permissions back."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        d.chmod(0o755)


def test_read_only_directory_with_a_complete_build_is_used(tmp_path, monkeypatch, writable_again):
    built = Path(cpu.load_extension()).parent  # this session's build, complete
    root = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    copy = root / built.name
    shutil.copytree(built, copy)
    writable_again += read_only(root, monkeypatch)
    fresh_process(monkeypatch)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)  # it is loaded already
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: no lock, no write, no fallback
        path = cpu.load_extension()
    assert path == str(copy / f"{copy.name}.so")
    assert loaded == [path]


def test_read_only_directory_without_a_build_says_so(tmp_path, monkeypatch, writable_again):
    root = tmp_path / "extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    writable_again += read_only(root, monkeypatch)
    fresh_process(monkeypatch)
    with pytest.warns(RuntimeWarning) as caught:
        assert cpu.load_extension() is None
    (message,) = [str(w.message) for w in caught if "native CPU kernel" in str(w.message)]
    assert "is not writable" in message and "TORCH_EXTENSIONS_DIR to a writable" in message
    assert "install" not in message  # the compiler is there: not the advice to install one


def test_an_incomplete_build_is_not_loaded(tmp_path):
    built = Path(cpu.load_extension()).parent
    assert cpu.complete_build(built) is not None
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    library = copy / f"{copy.name}.so"
    library.write_bytes(library.read_bytes()[:-1])  # e.g. a link cut short
    assert cpu.complete_build(copy) is None
    assert cpu.complete_build(tmp_path / "nothing-here") is None


@pytest.mark.parametrize(
    "change", ["torch_path", "torch_config", "compiler", "python_abi", "flags", "sources"]
)
def test_build_name_keys_everything_that_changes_the_binary(change, monkeypatch, tmp_path):
    """Two environments (another torch installation or build, compiler, Python) never share a
    build directory; the same environment always finds its own."""
    flags = cpu.build_flags()
    before = cpu._build_name(flags)
    assert cpu._build_name(cpu.build_flags()) == before
    if change == "torch_path":  # the same torch version installed in another environment
        other = "/other-env/lib/python3.11/site-packages/torch/__init__.py"
        monkeypatch.setattr(torch, "__file__", other)
    elif change == "torch_config":  # the same version built differently
        monkeypatch.setattr(torch.__config__, "show", lambda: "PyTorch built with: other flags")
    elif change == "compiler":
        monkeypatch.setenv("CXX", "renio-test-clang++")
    elif change == "python_abi":
        monkeypatch.setattr(sys.implementation, "cache_tag", "cpython-399")
    elif change == "flags":
        flags = [*flags, "-g"]
    else:
        csrc = tmp_path / "csrc"
        shutil.copytree(cpu.CSRC, csrc)
        with open(csrc / cpu.SOURCES[0], "a") as f:
            f.write("// edited\n")
        monkeypatch.setattr(cpu, "CSRC", csrc)
    assert cpu._build_name(flags) != before


# --- fork ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_forked_child_with_one_thread_computes_the_loss():
    """The package adds no fork hazard of its own: after multi-threaded loss calls in the parent
    (native kernel, gradient cache), a forked child that follows docs/usage.md (one thread)
    computes the same loss and gradient. (A child that keeps several threads can hang in
    libgomp after any multi-threaded torch op: that hazard is torch's, documented there.)"""
    s, t, labels = make_inputs(3, 5, 300)

    def run(backend):
        x = s.detach().clone().requires_grad_()
        loss = renio_kernels.renio_loss(x, t, labels, backend=backend, beta=0.5, token_clip=0.3)
        loss.backward()
        return loss.detach(), x.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = {b: run(b) for b in ("cpu", "torch", "auto")}
    finally:
        torch.set_num_threads(threads)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            results = {b: run(b) for b in expected}
            code = 0
            for backend, (loss, grad) in results.items():
                ref_loss, ref_grad = expected[backend]
                if not (torch.allclose(loss, ref_loss) and torch.allclose(grad, ref_grad)):
                    code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung computing the loss")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's loss differs or it raised"
