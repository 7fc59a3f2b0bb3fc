"""Golden snapshots: the reference's answers stored as files, replayed and compared.

- store.py             the file format: reading, writing and validating group files
- json_layout.py       the readable JSON layout the files are written in
- recorder.py          recording an engine's (or the reference's) answers to the catalogue
- oracle.py            replaying stored answers in place of the live reference
- compare.py           comparing two snapshot folders group by group
- syrupy_extension.py  the syrupy extension that checks the reference against its goldens
"""
