"""The macOS layer checked without a Mac: what Boxpark's PyObjC code names, against Apple's API as PyObjC records it.

`scan` reads the macOS modules' source (AST only, nothing imported); `extract` turns PyObjC's metadata scans
into the committed table tests/unit/data/macos_api.json; tests/unit/test_macos_api.py checks one against the
other. Never imports PyObjC or the scanned modules' macOS code.
"""
