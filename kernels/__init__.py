def hello(): return "k"
