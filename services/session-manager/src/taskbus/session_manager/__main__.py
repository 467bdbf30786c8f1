from taskbus.session_manager.app import main

main()
