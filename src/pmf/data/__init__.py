"""Training data: Fashion-MNIST, image folders and the resumable loader (:mod:`.datasets`), prepared shards
(:mod:`.shards`, :mod:`.prepare`, its sources :mod:`.sources`), the file index (:mod:`.filelist`) and image files
(:mod:`.images`)."""
