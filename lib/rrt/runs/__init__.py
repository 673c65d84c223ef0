"""The run layer: every notebook, `make sweep` job and served model goes through it.

A `Run` (store.py: its TrainConfig, tags and what it reads; its key, directory and run.json in the
run store), the cost model (cost.py), and the one loop that trains a run or reads it back
(execute.py). `python -m rrt.runs <run dir>/run.json` trains and evaluates one run as its own job.
"""
from rrt.runs.cost import COST_RULE, plan_table, train_flops
from rrt.runs.execute import (StudyData, average_accuracy, by_role, execute_run, load_data, read_results, run_plan,
                              save_tables, train_runs)
from rrt.runs.store import DataSpec, EvalSpec, Run, label_of, make_run, read_run_file, tag_is_true, write_run_files

__all__ = ["COST_RULE", "DataSpec", "EvalSpec", "Run", "StudyData", "average_accuracy", "by_role",
           "execute_run", "label_of", "load_data", "make_run", "plan_table", "read_results", "read_run_file",
           "run_plan", "save_tables", "tag_is_true", "train_flops", "train_runs", "write_run_files"]
