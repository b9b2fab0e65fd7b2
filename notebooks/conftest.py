"""Notebooks run under pytest (nbmake) with small workloads: the kernels
inherit this environment, and import this checkout's smedjan."""
import os
import pathlib

os.environ["SMEDJAN_NOTEBOOK_SMALL"] = "1"
_root = str(pathlib.Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = _root + (os.pathsep + os.environ["PYTHONPATH"]
                                    if os.environ.get("PYTHONPATH") else "")
