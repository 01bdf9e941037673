"""Issue 14 end to end: a FIDO2 key as the token, pulled mid-write, in the QEMU guest.

The host has no uhid, so in one guest boot tests/usbrig_scripts/fido2_cycles.py turns
the software authenticator into a real /dev/hidrawN (uhid + hid-generic), and the CLI
finds it through python-fido2's Linux hidraw backend. It enrols a vault with `init
--token fido2`, checks that a wrong key and a wrong PIN are refused and an untouched key
times out, then CYCLES times: plug the key, `mount`, append + fsync lines in the vault,
destroy the uhid device (the kernel's unplug), and stamp (guest CLOCK_MONOTONIC) when
the mount has left mountinfo and the daemon has exited. Every mount after a pull must
hold every accepted line. Finally a backup key is enrolled and opens the vault alone,
and fsck is clean. `token add` is also run with both keys
plugged, the opening key found by the unlock itself.

Latency (a) is from the first kernel `remove` uevent below the HID device, as for the
stick (tests/test_e2e_unplug.py), whose 250 ms p99 target is reported, not asserted; the
assertion is the bound a real regression breaks (p99 <= 1 s).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_support import percentiles
from needs import qemu_opt_out
from usbrig.rig import UsbRig

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent / "usbrig_scripts" / "fido2_cycles.py"
CYCLES = int(os.environ.get("KRYPTVAULT_E2E_FIDO2_CYCLES", "20"))  # fewer for a quick look
P99_TARGET_MS = 250.0
P99_LIMIT_MS = 1000.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    qemu_opt_out()
    workdir = tmp_path_factory.mktemp("e2e-fido2")
    with UsbRig(workdir, []) as rig:
        result_file = rig.chan_dir / "fido2.json"
        done = rig.run(
            f"{rig.python} -u {SCRIPT} --cycles {CYCLES} --out {rig.guest_path(rig.chan_dir)}/fido2.json",
            timeout=600,
        )
        assert result_file.exists(), f"rc={done.rc}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        result: dict[str, Any] = json.loads(result_file.read_text())
    result["summary"] = summarize(result)
    (workdir / "fido2-latency.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    print(f"\n[fido2] {render(result['summary'])}", file=sys.stderr)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    records = result.get("records", [])
    events = [json.loads(line) for line in result.get("audit", "").splitlines() if line]

    def stats(key: str) -> dict[str, float]:
        return {k: round(v, 1) for k, v in percentiles([r[key] for r in records if key in r]).items()}

    return {
        "cycles_done": len(records),
        "uevent_to_locked_ms": stats("a_ms"),
        "destroy_to_locked_ms": stats("destroy_ms"),
        "mount_s": stats("mount_s"),
        "plug_s": stats("plug_s"),
        "routes": sorted({e.get("route", "") for e in events if e["event"] == "token_removed"}),
        "total_s": result.get("total_s"),
        "cycles_s": result.get("cycles_s"),
        "p99_target_ms": P99_TARGET_MS,
        "p99_asserted_ms": P99_LIMIT_MS,
    }


def render(summary: dict[str, Any]) -> str:
    def fmt(s: dict[str, float]) -> str:
        return " ".join(f"{k}={s[k]:.0f}" for k in ("p50", "p90", "p99", "max") if k in s) or "(none)"

    a = summary["uevent_to_locked_ms"]
    verdict = "(no figures)" if "p99" not in a else ("met" if a["p99"] <= P99_TARGET_MS else "NOT met")
    return "\n".join(
        [
            f"{summary['cycles_done']} key pulls (uhid destroy); ms until mount gone and daemon exited:",
            f"  (a) from the first remove uevent: {fmt(a)}",
            f"  target p99(a) <= {P99_TARGET_MS:.0f} ms: {verdict} (asserted: <= {P99_LIMIT_MS:.0f} ms)",
            f"  from the UHID_DESTROY write:      {fmt(summary['destroy_to_locked_ms'])}",
            f"  mount with the key (s): {fmt(summary['mount_s'])}; removal routes: {summary['routes']}",
            f"  guest script {summary['total_s']} s, of which the pulls {summary['cycles_s']} s",
        ]
    )


def _ok(res: dict[str, Any]) -> bool:
    return bool(res) and res["rc"] == 0


def test_the_guest_kernel_makes_a_hidraw_node_the_library_and_cli_find(run: dict[str, Any]) -> None:
    assert run["uhid_present"], run.get("modprobe")
    assert run["hidraw"] in run["library_lists"], run
    assert run["token_list"]["rc"] == 0, run["token_list"]
    listed = json.dumps(json.loads(run["token_list"]["out"]))
    assert run["hidraw"] in listed, run["token_list"]
    assert _ok(run["init"]), run["init"]


def test_a_wrong_key_or_pin_is_refused_and_an_untouched_key_times_out(run: dict[str, Any]) -> None:
    wrong = run["wrong_key"]
    assert wrong["rc"] != 0
    assert wrong["err"].strip().splitlines()[-1] == (
        "kryptvault: none of the plugged security keys (1) holds a credential of this vault"
    ), wrong
    assert _ok(run["pin_init"]), run["pin_init"]
    wrong_pin = run["wrong_pin"]
    assert wrong_pin["rc"] != 0
    assert wrong_pin["err"].strip().splitlines()[-1].startswith(
        "kryptvault: wrong PIN for the security key"
    ), wrong_pin
    untouched = run["no_touch"]
    assert untouched["rc"] != 0
    assert untouched["err"].strip().splitlines()[-1] == (
        "kryptvault: the security key was not touched within 1 s"
    ), untouched
    assert 1 <= untouched["wall_s"] < 30, untouched


def test_every_pull_locks_and_keeps_every_fsynced_line(run: dict[str, Any]) -> None:
    assert run["fatal"] is None, run["fatal"] + "\n" + run.get("uevents_tail", "")
    records = run["records"]
    assert len(records) == CYCLES
    for rec in records:
        assert rec["watch"].get("end") is not None, rec
        assert "first_remove" in rec, rec
        # The writer learnt of the lock by an error, not by being killed.
        assert rec["writer_rc"] == 0 and rec["writer"]["error"], rec
        assert rec["writer"]["fsynced"] >= 5, rec
        if rec["cycle"]:
            assert rec["verify"]["ok"], rec["verify"]
    assert run["final_verify"]["ok"], run["final_verify"]
    assert run["final_verify"]["lines"] >= run["fsynced_total"]
    assert _ok(run["final_lock"]), run["final_lock"]


def test_each_lock_is_recorded_as_an_unplug(run: dict[str, Any]) -> None:
    events = [json.loads(line) for line in run["audit"].splitlines() if line]
    locks = [e for e in events if e["event"] == "lock"]
    assert [e["reason"] for e in locks[:CYCLES]] == ["unplug"] * CYCLES, locks
    for lock in locks[:CYCLES]:
        assert lock["route"] in ("uevent", "mount", "poll") and lock["error"] is None, lock


def test_a_backup_key_alone_opens_the_vault_and_it_stays_consistent(run: dict[str, Any]) -> None:
    assert run["fatal"] is None, run["fatal"]
    assert _ok(run.get("token_add", {})), (run.get("recovery_key_add"), run.get("token_add"))
    assert _ok(run["backup_mount"]), run["backup_mount"]
    assert run["backup_verify"]["ok"], run["backup_verify"]
    assert _ok(run["backup_lock"]), run["backup_lock"]
    assert _ok(run["fsck"]), run["fsck"]


def test_token_add_finds_the_opening_key_itself_with_two_keys_plugged(run: dict[str, Any]) -> None:
    assert _ok(run["token_add_default"]), run["token_add_default"]["err"][-600:]


def test_key_pull_to_locked_p99_within_one_second(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run["summary"]
    with capsys.disabled():
        print(f"\n[fido2] {render(summary)}")
    a = summary["uevent_to_locked_ms"]
    assert a.get("n") == CYCLES, summary
    assert a["p99"] <= P99_LIMIT_MS, render(summary)
