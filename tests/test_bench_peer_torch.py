"""`bench/peer_torch.py` times this project's step and, without guided-diffusion's code, says
that it skipped the peer instead of failing (the peer is never vendored, so CI has no copy)."""


def test_peer_bench_without_guided_diffusion_times_ours_and_skips_the_peer(run_bench, tmp_path):
    missing = tmp_path / "no-guided-diffusion"
    records = run_bench("peer_torch.py", "--smoke", f"--guided_diffusion={missing}")
    assert [r["impl"] for r in records] == ["ddpm_bs", "guided_diffusion"]
    ours, peer = records
    assert ours["bench"] == peer["bench"] == "peer_torch" and ours["config"] == "adm_7m(smoke)"
    assert ours["img_per_s_min"] <= ours["img_per_s"] <= ours["img_per_s_max"]
    assert ours["img_per_s"] > 0 and ours["params"] > 0
    assert str(missing) in peer["skipped"] and "ratio" not in peer
