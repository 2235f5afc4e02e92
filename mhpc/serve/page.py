PAGE = "<html><body>todo</body></html>"
