def test_import_and_version():
    import memloc
    assert memloc.__version__
