from slit_lightning.bench import main

main()
