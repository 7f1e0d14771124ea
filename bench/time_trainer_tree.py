"""Median GRPO step time of bench_trainer.run_ours (demo task, 150 steps x 3 seeds, 1 thread) for the
package in TREE (a git work tree of another commit, with the compiled _C copied into TREE/grpo_fast and
TREE/kernels linked as TREE/grpo_fast/kernels) or HEAD (this checkout). Run trees in alternating processes
to compare commits side by side:  python bench/time_trainer_tree.py /tmp/wt-old ; python bench/time_trainer_tree.py HEAD
"""
import sys, statistics, tempfile, os
tree = sys.argv[1]
if tree != "HEAD":
    sys.meta_path = [f for f in sys.meta_path if "skbc" not in type(f).__module__ and "editable" not in type(f).__module__]
    sys.path.insert(0, tree)
    sys.path.insert(0, os.path.join(tree, "bench"))
else:
    sys.path.insert(0, "/work/main/bench")
import torch
torch.set_num_threads(1)
import grpo_fast
from grpo_fast import demo
import bench_trainer as bt
print(grpo_fast.__file__)
parts = demo.build_demo(0, verbose=False)
steps = []
for seed in range(3):
    r, t, s = bt.run_ours(parts, 150, tempfile.mkdtemp(), seed)
    steps += [b - a for a, b in zip(s, s[1:])]
print(tree, "median step ms", 1000 * statistics.median(steps), "reward last", sum(r[-30:]) / 30)
