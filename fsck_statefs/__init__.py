"""fsck-statefs: check and repair StateFS images offline (no daemon needed).

check.py reads, repair.py rewrites through statefsd's engine, report.py
renders, cli.py is the command line. The on-disk format is statefsd's
(format.py, logscan.py, replay.py); nothing here re-declares it.
"""
