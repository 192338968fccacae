#!/usr/bin/env python
"""agent.py as the subprocess tests run it: the hooks of tests/faults.py first, as the
environment asks (kill points, quick retries, a short lease), then agent.py's own main.

    python tests/agent_entry.py run --config run.yaml ...   # same arguments as agent.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# agent.py's launcher starts each rank of a multi-rank session from this script, not from
# agent.py, so the hooks below reach every rank (agent.entry_script reads this flag).
AGENT_ENTRY = True
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    from tests import faults

    faults.install_test_settings()
    faults.install_from_env()
    faults.install_overflow_from_env()
    faults.install_probe_fault_from_env()
    import agent

    return agent.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
