"""Triton's compile cache kept in the workdir (session/compile_cache.py)."""

from __future__ import annotations

from baton.session.compile_cache import keep_compile_cache


def test_a_session_points_triton_at_its_workdir_and_a_chosen_folder_stands(tmp_path,
                                                                          monkeypatch):
    import triton

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = keep_compile_cache(tmp_path / "work")
    assert folder == tmp_path / "work" / "triton" and folder.is_dir()
    assert triton.knobs.cache.dir == str(folder), "Triton reads it at its next compile"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_compile_cache(tmp_path / "other") == tmp_path / "mine"
    assert not (tmp_path / "other").exists()
