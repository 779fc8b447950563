#!/usr/bin/env bash
# Does a C++ argument error of the freshly built extension raise (as it must), or kill the process (every one
# did on the 2026-11-28 H100 build, not here)? And what built and links the extension, for diagnosing it:
# the compiler torch's build used (a wrapper script?), the C++ runtime the .so needs or carries statically.
# Cheap (seconds): the device check runs it right after the build.
cd "$(dirname "$0")/.."
PY=${FASTCONV_PYTHON:-python3}
so=$(ls fastconv/_C*.so 2>/dev/null | head -n 1)
echo "== extension: $so"
echo "== compilers: CXX=${CXX:-(unset)}"
for c in c++ g++ gcc; do
  p=$(command -v "$c") || continue
  echo "$c -> $p -> $(readlink -f "$p")"
  if file "$(readlink -f "$p")" | grep -q text; then echo "   (a script:)"; head -n 30 "$(readlink -f "$p")" | sed 's/^/   | /'; fi
  "$p" --version 2>&1 | head -n 1 | sed 's/^/   /'
done
grep -h -m2 -E '^(cxx|ldflags) = ' build/temp*/build.ninja 2>/dev/null | cut -c1-300 | sed 's/^/build.ninja: /'
"$PY" -c 'import sysconfig as s; [print(f"python sysconfig {k}: {s.get_config_var(k)}") for k in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "LDFLAGS", "CFLAGS")]'
echo "== ldd"; ldd "$so" 2>&1 | grep -E "stdc\+\+|gcc_s|libc\.so|torch|c10" 
echo "== C++ runtime symbols defined inside the .so (a statically linked runtime shows here)"
nm -D --defined-only "$so" 2>/dev/null | grep -E " (__cxa_throw|__cxa_begin_catch|_Unwind_RaiseException|__gxx_personality_v0)$" || echo "   none"
echo "== probes"
"$PY" - <<'PYEOF'
import subprocess, sys
probes = {
    "fastconv C++ argument error (must raise ValueError)":
        "import torch, fastconv\n"
        "try:\n"
        "    torch.ops.fastconv.conv2d_direct(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 2, False)\n"
        "except ValueError as e:\n"
        "    print('raised ValueError:', str(e)[:100])\n",
    "torch's own C++ argument error (for comparison)":
        "import torch\n"
        "try:\n"
        "    torch.nn.functional.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), groups=2)\n"
        "except RuntimeError as e:\n"
        "    print('raised', type(e).__name__)\n",
}
for name, code in probes.items():
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    print(f"{name}: exit status {r.returncode}: {r.stdout.strip()} {r.stderr.strip()[-600:]}")
PYEOF
