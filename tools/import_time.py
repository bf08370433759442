"""Measure, side by side in fresh interpreters, how long `import torch`, `import umedpt` and the first use of a
package-level name take; prints the medians and the ratio umedpt / torch (goal: <= 1.25)."""
import statistics, subprocess, sys

def seconds(stmt: str, repeat: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                  check=True).stdout) for _ in range(repeat))

if __name__ == "__main__":
    rows = {"import torch": seconds("import torch"), "import umedpt": seconds("import umedpt"),
            "import umedpt; umedpt.SharedBlocks": seconds("import umedpt; umedpt.SharedBlocks")}
    for k, v in rows.items(): print(f"{k:40s} {v:6.2f} s")
    print(f"ratio import umedpt / import torch: {rows['import umedpt'] / rows['import torch']:.2f} (goal <= 1.25)")
