"""A resumed run's optimizer updates are the uninterrupted run's, bit for bit, on a CPU: DeepSpeed's
CPU Adam keeps beta^t as a running product that a new process would recompute with pow (the chaos
soak found the drift); `replay_cpu_adam_steps` rebuilds the product after a load."""

import torch

from pretrain.runtime.engine import replay_cpu_adam_steps


def _train(split: int | None, replay: bool) -> torch.Tensor:
    from deepspeed.ops.adam import FusedAdam

    torch.manual_seed(0)
    start = torch.randn(4096)
    grads = [torch.randn(4096) for _ in range(7)]
    p = torch.nn.Parameter(start.clone())
    opt = FusedAdam([p], lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, adam_w_mode=True)
    for i, g in enumerate(grads):
        if i == split:  # a resume: a new optimizer loads the state; the kernel's state is another process's
            state = opt.state_dict()
            opt = FusedAdam([p], lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, adam_w_mode=True)
            opt.load_state_dict(state)
            one = [[torch.zeros(1)] for _ in range(4)]
            opt.multi_tensor_adam(2048, torch.zeros(1, dtype=torch.int), one, 0.0, 0.9, 0.98, 1e-8, 10**6, 1, 1, 0.0)
            if replay:
                assert replay_cpu_adam_steps(opt) == split
        p.grad = g.clone()
        opt.step()
    return p.detach().clone()


def test_deepspeed_cpu_adam_resumes_bit_exact_once_its_steps_are_replayed():
    uninterrupted = _train(None, False)
    assert torch.equal(_train(4, replay=True), uninterrupted)
    assert not torch.equal(_train(4, replay=False), uninterrupted), "without the replay the last bits differ"
