"""Fail loudly when the virtualenv does not hold the pinned torch/torchvision or has broken requirements."""
import re, subprocess, sys
from pathlib import Path

pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", Path("constraints.txt").read_text(), re.M))
problems = []
for name, want in pins.items():
    mod = __import__(name)
    have = mod.__version__.split("+")[0]
    if have != want: problems.append(f"{name} is {mod.__version__}, constraints.txt pins {want}")
import torchvision.ops  # the nms operator must load: a mismatched wheel fails here
check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
if check.returncode: problems.append("pip check:\n" + check.stdout + check.stderr)
if problems:
    sys.exit("environment check failed:\n- " + "\n- ".join(problems))
import torch
print(f"environment ok: torch {torch.__version__}, torchvision {torchvision.__version__}, pip check clean")
