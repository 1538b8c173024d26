from deviceplugin.main import main

main()
