import signal, pytest
from test_interrupt_concurrency import run_and_interrupt, _big, BIG, stored_results, db, _fresh_template
from fakes import make_plan, insert_plan
@pytest.mark.parametrize("gap", [0.0005, 0.001,0.002,0.005, 0.01, 0.02]*3)
def test_diag(db, fake_llm, state_dir, project, gap):
    originals = {"big.txt": _big("o"), "big2.txt": _big("p"), "a.txt": b"A0\n"}
    for name, data in originals.items():
        (project / name).write_bytes(data)
    plan = make_plan("p-big", [
        {"id": 1, "prompt": "rewrite big", "file_output": "big.txt"},
        {"id": 2, "prompt": "rewrite big2", "file_output": "big2.txt"},
        {"id": 3, "prompt": "rewrite a", "file_output": "a.txt"},
        {"id": 4, "prompt": "create c", "file_output": "new/c.txt"},
        {"id": 5, "prompt": "the slow one", "depends_on": [4]},
    ], context={"objective": "x", "project": str(project)}, rollback_strategy="revert_files")
    insert_plan(db, plan)
    fake_llm.enqueue(_big("n").decode(), chunk_size=65536)
    fake_llm.enqueue(_big("m").decode(), chunk_size=65536)
    fake_llm.enqueue("A1\n").enqueue("C1\n")
    fake_llm.enqueue("partial " * 4, fault="stall", delay_s=5)
    rc, out, err, elapsed = run_and_interrupt(db, fake_llm, state_dir, signal.SIGINT, in_flight=5,
                                              extra=("--max-output-bytes", str(8 * BIG)), repeats=5, gap=gap)
    ok = all((project / n).read_bytes() == d for n, d in originals.items())
    if "Traceback" in err: print("\nERR>>>", err[err.index("Traceback"):])
    print(f"\nDIAG gap={gap} rc={rc} el={elapsed:.3f} notes={err.count('finishing cleanup')} tb={'Traceback' in err} ok={ok} results={len(stored_results(db))}")
