"""``gatednorm install-hook`` / ``uninstall-hook``: an opt-in ``.pth`` file that applies ``GATEDNORM_PATCH``
at interpreter start, so the patch is in place before any model code runs.

When ``GATEDNORM_PATCH`` is set, the hook runs ``import gatednorm.integrations as g; g.apply_env_patch()``;
when it is not, the hook costs one environment lookup and imports nothing. Any failure is reported on
stderr and never stops the interpreter. Installing gatednorm never writes the hook.
"""

from __future__ import annotations

import os
import sysconfig

PTH_NAME = "gatednorm-patch-hook.pth"

# What the hook runs when GATEDNORM_PATCH is set.
HOOK_CODE = "import gatednorm.integrations as g; g.apply_env_patch()"

# One line: site.py executes .pth lines that start with "import". The try/except is exec'd (a .pth line
# cannot hold a compound statement), so a failing import or patch only writes a line to stderr.
PTH_LINE = (
    "import os, sys; exec(\"try:\\n " + HOOK_CODE + "\\nexcept Exception as e:\\n"
    " sys.stderr.write('gatednorm-patch-hook: %r\\\\n' % (e,))\") if os.environ.get('GATEDNORM_PATCH') else None\n"
)


def default_site_dir() -> str:
    return sysconfig.get_paths()["purelib"]


def install_hook(site_dir: str | None = None) -> str:
    """Write the hook into ``site_dir`` (default: this interpreter's site-packages); returns its path."""
    path = os.path.join(site_dir or default_site_dir(), PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# written by `gatednorm install-hook`; remove with `gatednorm uninstall-hook`\n")
        f.write(PTH_LINE)
    return path


def uninstall_hook(site_dir: str | None = None) -> str | None:
    """Remove the hook; returns the removed path, or None when there was none."""
    path = os.path.join(site_dir or default_site_dir(), PTH_NAME)
    if not os.path.exists(path):
        return None
    os.remove(path)
    return path


def main(command: str, site_dir: str | None) -> int:
    """CLI entry for ``install-hook`` / ``uninstall-hook``."""
    if command == "install-hook":
        path = install_hook(site_dir)
        print(f"wrote {path}\nset GATEDNORM_PATCH=all (or e.g. sglang,fla) to patch at interpreter start")
        return 0
    path = uninstall_hook(site_dir)
    print(f"removed {path}" if path else "no gatednorm hook installed")
    return 0
