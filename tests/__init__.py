"""Test suite (a package, so that ``tests.*`` never resolves to a site-packages ``tests`` such as pyiqa's)."""
