"""Behaviour in real training loops: autocast (AMP) and GradScaler, determinism, several Python threads,
DistributedDataParallel (gloo, 2 processes), bad module state, 64-bit index math; and, with a GPU, side
streams, CUDA graph capture and tensors past 2^31 elements."""
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import cuda
from helpers import assert_close_to, rel_err

OPS = torch.ops.fastconv
ROOT = Path(__file__).resolve().parent.parent


def small_torch_net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).to(dtype)


# ---- autocast -----------------------------------------------------------------------------------------


def test_autocast_op_rules_cpu():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert OPS.conv2d_direct(x, w, None, *conv).dtype == torch.bfloat16  # lower-precision op, like conv2d
        assert OPS.conv2d_im2col(x, w, torch.randn(4), *conv, 2**20).dtype == torch.bfloat16
        assert OPS.conv2d_direct(x.double(), w.double(), None, *conv).dtype == torch.float64  # fp64 is left alone
        gy = torch.randn(2, 4, 8, 8)
        assert OPS.conv2d_im2col_dgrad(gy, w, [2, 3, 8, 8], *conv, 2**20).dtype == torch.bfloat16
        assert OPS.residual_add(x.bfloat16(), x, 1, True).dtype == torch.float32  # promotes, like add
        y, mean, var = OPS.batch_norm_relu(x.bfloat16(), torch.ones(3), torch.zeros(3), 1e-5, True)
        assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32  # statistics stay fp32
        assert fastconv.functional.max_pool2d(x.bfloat16(), 2).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_converted_model_under_cpu_autocast_matches_torchs_autocast(dtype):
    ref = small_torch_net()
    ours = fastconv.convert(small_torch_net())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 16, 16)
    outs, grads = [], []
    for model in (ours, ref):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    assert outs[0].dtype == outs[1].dtype  # the Linear's output dtype under autocast
    assert rel_err(outs[0], outs[1]) < 3e-2
    # norm-wise, with a floor: the conv bias before BatchNorm has a gradient that is rounding noise
    floor = 1e-3 * max(rg.norm().item() for rg in grads[1])
    for g, rg in zip(*grads):
        assert g.dtype == torch.float32
        assert (g - rg).norm().item() / max(rg.norm().item(), floor) < 6e-2


def test_fastconv_resnet_trains_under_cpu_autocast_with_grad_scaler():
    torch.manual_seed(0)
    model = fastconv.models.resnet20(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.bn1.running_var.dtype == torch.float32


# ---- determinism ----------------------------------------------------------------------------------------


def test_every_kernel_is_deterministic_under_deterministic_algorithms():
    """No fastconv kernel uses atomics (see README): deterministic mode runs them and repeats bit for bit."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = fastconv.models.resnet18(num_classes=10)
        x = torch.randn(2, 3, 48, 48)
        runs = []
        for _ in range(2):
            model.zero_grad()
            torch.manual_seed(0)
            out = model(x)
            out.square().sum().backward()
            runs.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(previous)


# ---- threads --------------------------------------------------------------------------------------------


def test_concurrent_calls_from_threads_give_serial_results():
    torch.manual_seed(0)
    fused = fastconv.ConvBNReLU(4, 8, 3, padding=1).eval()  # shared: its folded-weight cache is contended
    conv = fastconv.Conv2d(4, 8, 3, padding=1, algo="direct")
    pool = fastconv.MaxPool2d(3, 2, 1)
    inputs = [torch.randn(2, 4, 12, 12) for _ in range(16)]

    def work(x):
        with torch.no_grad():
            a = fused(x)
            return [a, conv(x), pool(a), fastconv.functional.residual_add(a, conv(x), relu=True)]

    serial = [work(x) for x in inputs]
    fused._fold_cache.key = None  # the threads must refold concurrently
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (keep the intra-op pool out of the picture: the Python threads are the test)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool_:
            parallel = list(pool_.map(work, inputs * 4))
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(parallel, serial * 4):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_benchmark_cache_is_guarded_by_a_lock():
    assert isinstance(fastconv.backends._benchmark_lock, type(threading.Lock()))
    fastconv.backends.clear_benchmark_cache()


# ---- DistributedDataParallel (gloo, 2 processes) --------------------------------------------------------

DDP_WORKER = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
import fastconv
rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.Sequential(fastconv.Conv2dReLU(3, 8, 3, padding=1), fastconv.MaxPool2d(2),
                            fastconv.Conv2d(8, 8, 3, padding=1, algo="direct"), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 10)).double()
ddp = torch.nn.parallel.DistributedDataParallel(model)
x = torch.load(os.path.join(os.path.dirname(init_file), "x.pt"))
half = x.shape[0] // world
out = ddp(x[rank * half:(rank + 1) * half])
(out.square().sum() / half).backward()  # local mean; DDP averages the ranks: the global mean
torch.save([p.grad for p in model.parameters()], os.path.join(os.path.dirname(init_file), f"grads{rank}.pt"))
# both ranks done before either tears gloo down (a rank destroying its group while the other still talked to it
# aborted once, "terminate called without an active exception", in a loaded CI run)
dist.barrier()
dist.destroy_process_group()
'''


def test_ddp_gloo_two_processes_matches_single_process_full_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    init = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(init), str(ROOT)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastconv.Conv2dReLU(3, 8, 3, padding=1), fastconv.MaxPool2d(2),
                                fastconv.Conv2d(8, 8, 3, padding=1, algo="direct"), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10)).double()
    (model(x).square().sum() / x.shape[0]).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for g, p in zip(grads, model.parameters()):
            assert_close_to(g, p.grad, 1e-12, f"rank {rank} gradient")


# ---- bad state ------------------------------------------------------------------------------------------


def test_bad_module_state_raises_clear_errors():
    conv = fastconv.Conv2d(3, 4, 3).half()
    with pytest.raises(TypeError, match=r"input \(torch.float32\) and weight \(torch.float16\) must have the same dtype"):
        conv(torch.randn(1, 3, 8, 8))
    conv = fastconv.Conv2d(3, 4, 3)
    conv.in_channels = 5  # changed by hand: the weight still has 3 input channels
    with pytest.raises(ValueError, match=r"expects 3 input channels, but the input has 5"):
        conv(torch.randn(1, 5, 8, 8))
    fused = fastconv.ConvBNReLU(3, 4, 3)
    fused.conv.weight = torch.nn.Parameter(torch.randn(6, 3, 3, 3))  # 6 output channels, bn still has 4
    with pytest.raises(ValueError, match=r"conv produces 6 channels but bn has 4 features"):
        fused(torch.randn(2, 3, 8, 8))
    fused = fastconv.ConvBNReLU(3, 4, 3)
    fused.bn.to("meta")  # parameters on another device than the input
    with pytest.raises(ValueError, match=r"is on meta"):
        fused(torch.randn(2, 3, 8, 8))


# ---- 64-bit index math ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_shared_index_helpers_past_2_31(tmp_path):
    exe = tmp_path / "index_math_test"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "cpp" / "index_math_test.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout


# ---- CUDA: streams, graphs, huge tensors ----------------------------------------------------------------


@cuda
@pytest.mark.cuda
def test_cuda_side_stream_gives_the_same_results():
    torch.manual_seed(0)
    model = fastconv.models.resnet18(num_classes=10).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")

    def step():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    main = step()
    model.load_state_dict(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(main, other))


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture_of_forward_and_backward():
    torch.manual_seed(0)
    model = fastconv.models.resnet18(num_classes=10).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    eager = fastconv.models.resnet18(num_classes=10).cuda()
    eager.load_state_dict(model.state_dict())
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    out = graphed(x)
    out.square().sum().backward()
    ref = eager(x)
    ref.square().sum().backward()
    assert_close_to(out.detach(), ref.detach(), 1e-5, "graphed output")
    for p, q in zip(model.parameters(), eager.parameters()):
        assert_close_to(p.grad, q.grad, 1e-4, "graphed gradient")
    # make_graphed_callables ran the model's training forward 3 more times (its warm-up, on x) than eager's, each
    # updating BatchNorm's running statistics: the same 3 steps on eager give the same statistics.
    for _ in range(3):
        eager(x)
    for (name, b), (_, rb) in zip(model.named_buffers(), eager.named_buffers()):
        if b.is_floating_point():
            assert_close_to(b, rb, 1e-5, f"graphed {name}")
        else:
            assert torch.equal(b, rb), name  # num_batches_tracked
    # eval-mode inference through torch.cuda.graph, replayed on new data
    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    static_x = x.clone()
    with torch.no_grad():
        model(static_x)  # warm the folded-weight caches before capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = model(static_x)
        static_x.copy_(torch.randn_like(x))
        g.replay()
        assert_close_to(static_out, eager(static_x), 1e-5, "replayed output")


@cuda
@pytest.mark.cuda
def test_cuda_more_than_2_31_elements_pool_residual_conv():
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs about 40 GiB of free GPU memory")
    x = torch.randn(1, 8, 16400, 16400, device="cuda", dtype=torch.bfloat16)  # 2.15e9 elements
    assert x.numel() > 2**31
    y = fastconv.functional.max_pool2d(x, 2)
    assert torch.equal(y[0, :, -4:, -4:], F.max_pool2d(x[:, :, -8:, -8:], 2)[0])
    out = fastconv.functional.residual_add(x, x, relu=True)
    assert torch.equal(out[0, -1, -2:], torch.relu(x[0, -1, -2:] + x[0, -1, -2:]))
    del out, y
    w = torch.randn(1, 8, 1, 1, device="cuda", dtype=torch.bfloat16)
    c = fastconv.functional.conv2d(x, w, algo="direct")
    ref = F.conv2d(x[:, :, -3:, -3:].float(), w.float())
    assert rel_err(c[:, :, -3:, -3:], ref) < 1e-2


# ---- transforms -----------------------------------------------------------------------------------------


def test_forward_mode_ad_is_refused_not_silently_wrong():
    import torch.autograd.forward_ad as fwAD
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    calls = [lambda x: fastconv.functional.conv2d(x, w, padding=1),
             lambda x: fastconv.functional.max_pool2d(x, 2),
             lambda x: fastconv.functional.residual_add(x, x),
             lambda x: fastconv.ConvBNReLU(2, 3, 3)(x),
             lambda x: fastconv.Conv2dReLU(2, 3, 3)(x)]
    for f in calls:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(f, (x,), (torch.randn_like(x),))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(fwAD.make_dual(x, torch.randn_like(x)))


def test_vmap_runs_per_sample():
    x, w = torch.randn(4, 1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    out = torch.func.vmap(lambda xi: fastconv.functional.conv2d(xi, w, padding=1))(x)
    assert torch.allclose(out, torch.stack([F.conv2d(xi, w, padding=1) for xi in x]))


def test_vmap_keeps_gradients_of_batched_inputs():
    # Inside vmap a batched tensor reports requires_grad=False even when the tensor it wraps needs a gradient:
    # fastconv's skip-the-autograd-kernel fast path (ops.call) must not take that at its word.
    x = torch.randn(4, 1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    out = torch.func.vmap(lambda xi: fastconv.functional.conv2d(xi, w, padding=1))(x)
    (out.sum() + x.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    (torch.stack([F.conv2d(xi, w, padding=1) for xi in xr]).sum() + xr.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)
