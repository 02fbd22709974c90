from ..commands import module_main

module_main("dropout")
